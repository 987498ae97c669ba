//! How guest memory is backed: what the host offers, and the mapping itself.
//!
//! * `memfd`: shared memory (shmem) behind a memfd, shareable by fd with a
//!   VMM or another process. The default. The kernel allocates it in base
//!   pages unless shmem THP is enabled for every mapping (`always`/`force`).
//! * `memfd-thp`: the same with `MADV_HUGEPAGE`, which shmem honours when
//!   `/sys/kernel/mm/transparent_hugepage/shmem_enabled` is `advise`,
//!   `within_size` or `always`.
//! * `anon`: private anonymous memory, base pages (`MADV_NOHUGEPAGE`).
//! * `anon-thp`: private anonymous memory with `MADV_HUGEPAGE`, as QEMU maps
//!   guest RAM: faults are served in PMD-sized huge pages when the kernel
//!   has them (`transparent_hugepage/enabled` is `madvise` or `always`).
//! * `hugetlb`: a `MFD_HUGETLB` memfd, backed by pages reserved in advance
//!   (`vm.nr_hugepages`).
//!
//! A fresh page is zeroed by the kernel on its first fault; a huge page costs
//! one fault where base pages cost 512. That is why the destination, which
//! fills all of its memory once, wants huge pages, except in a virtual
//! machine whose hypervisor takes back free memory (free page reporting,
//! see [`host_reclaims_free_blocks`]): there every fresh huge page is
//! faulted in again by the host, 4 KiB at a time, and base pages, which the
//! kernel carves first from smaller free blocks the host never took back,
//! fill faster. They also leave a guest's zero pages unallocated, where a
//! huge page covering one written page allocates all of it.

use std::fs::File;
use std::ptr::NonNull;

use rustix::fs::{ftruncate, memfd_create, MemfdFlags};
use rustix::mm::{madvise, mmap, mmap_anonymous, munmap, Advice, MapFlags, ProtFlags};

use crate::error::{CoreError, CoreResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    Memfd,
    MemfdThp,
    Anon,
    AnonThp,
    Hugetlb,
}

/// Every backing, fastest to fill first on a host whose free memory stays
/// with the kernel (benches/bench_receive.py measures the order on the host
/// at hand); `auto` picks the first available.
pub const FASTEST_FIRST: [Backing; 5] = [
    Backing::Hugetlb,
    Backing::AnonThp,
    Backing::MemfdThp,
    Backing::Anon,
    Backing::Memfd,
];

/// The same when the hypervisor takes back free huge-page-sized blocks:
/// transparent huge pages come only from such blocks and fill slowest.
/// (The hugetlb pool is reserved, never free, so never taken back.)
const FASTEST_FIRST_RECLAIMED: [Backing; 5] = [
    Backing::Hugetlb,
    Backing::Anon,
    Backing::Memfd,
    Backing::AnonThp,
    Backing::MemfdThp,
];

/// The fill order for this host: [`FASTEST_FIRST`], or base pages before
/// transparent huge pages where [`host_reclaims_free_blocks`].
pub fn fill_order() -> [Backing; 5] {
    if host_reclaims_free_blocks() {
        FASTEST_FIRST_RECLAIMED
    } else {
        FASTEST_FIRST
    }
}

/// The virtio feature bit of free page reporting (`VIRTIO_BALLOON_F_REPORTING`).
const VIRTIO_BALLOON_F_REPORTING: usize = 5;

/// Whether this kernel runs under a hypervisor that takes back free memory:
/// a virtio balloon that negotiated free page reporting. The kernel then
/// reports free blocks of at least `page_reporting_order` (a huge page) and
/// the host discards them, so the first touch of each of their 4 KiB pages
/// traps to the host again.
pub fn host_reclaims_free_blocks() -> bool {
    let Ok(devices) = std::fs::read_dir("/sys/bus/virtio/drivers/virtio_balloon") else {
        return false;
    };
    devices.flatten().any(|d| {
        std::fs::read_to_string(d.path().join("features"))
            .is_ok_and(|f| f.as_bytes().get(VIRTIO_BALLOON_F_REPORTING) == Some(&b'1'))
    })
}

impl Backing {
    /// Parses a backing name; `auto` is the fastest the host offers for
    /// memory of `size` bytes.
    pub fn choose(name: &str, size: usize) -> CoreResult<Self> {
        if name == "auto" {
            return Ok(fastest_for(size));
        }
        Self::parse(name)
    }

    /// Parses the name of one backing.
    pub fn parse(name: &str) -> CoreResult<Self> {
        match name {
            "memfd" => Ok(Backing::Memfd),
            "memfd-thp" => Ok(Backing::MemfdThp),
            "anon" => Ok(Backing::Anon),
            "anon-thp" => Ok(Backing::AnonThp),
            "hugetlb" => Ok(Backing::Hugetlb),
            other => Err(CoreError::invalid(format!(
                "unknown memory backing {other:?} (expected auto, memfd, memfd-thp, anon, \
                 anon-thp or hugetlb)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backing::Memfd => "memfd",
            Backing::MemfdThp => "memfd-thp",
            Backing::Anon => "anon",
            Backing::AnonThp => "anon-thp",
            Backing::Hugetlb => "hugetlb",
        }
    }

    /// Whether the memory has a file descriptor another process can map.
    pub fn has_fd(self) -> bool {
        matches!(self, Backing::Memfd | Backing::MemfdThp | Backing::Hugetlb)
    }
}

/// Whether the host offers a backing, the page size it allocates in, and why.
#[derive(Clone, Debug)]
pub struct Offer {
    pub backing: Backing,
    pub available: bool,
    /// The unit the kernel allocates this backing in when it can.
    pub page_size: usize,
    pub reason: String,
}

const THP: &str = "/sys/kernel/mm/transparent_hugepage";

/// The selected value of a sysfs choice file (`always [madvise] never`).
fn sysfs_choice(path: &str) -> Option<String> {
    let raw = std::fs::read_to_string(path).ok()?;
    raw.split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        .map(str::to_string)
}

fn sysfs_number(path: &str) -> Option<usize> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The PMD size a transparent huge page covers (2 MiB on x86-64).
pub fn thp_size() -> usize {
    sysfs_number(&format!("{THP}/hpage_pmd_size")).unwrap_or(2 << 20)
}

/// The default hugetlb page size and how many such pages are free.
fn hugetlb_pool() -> (usize, usize) {
    let size = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("Hugepagesize:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        })
        .map_or(2 << 20, |kb| kb << 10);
    let free = sysfs_number(&format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB/free_hugepages",
        size >> 10
    ))
    .unwrap_or(0);
    (size, free)
}

/// What this host offers for each backing.
pub fn offers() -> Vec<Offer> {
    let base = rustix::param::page_size();
    let huge = thp_size();
    let anon_thp = sysfs_choice(&format!("{THP}/enabled"));
    let shmem_thp = sysfs_choice(&format!("{THP}/shmem_enabled"));
    let (hpage, free) = hugetlb_pool();
    let reclaimed = if host_reclaims_free_blocks() {
        "; the hypervisor takes back free huge-page-sized blocks (virtio-balloon free page \
         reporting), so fresh huge pages fill slower than base pages"
    } else {
        ""
    };
    fill_order()
        .iter()
        .map(|&backing| {
            let (available, page_size, reason) = match backing {
                Backing::Memfd => (
                    true,
                    if shmem_thp.as_deref() == Some("always") || shmem_thp.as_deref() == Some("force") {
                        huge
                    } else {
                        base
                    },
                    format!(
                        "shmem behind a memfd (shmem THP: {})",
                        shmem_thp.as_deref().unwrap_or("unknown")
                    ),
                ),
                Backing::Anon => (true, base, "private anonymous memory, base pages".into()),
                Backing::AnonThp => match anon_thp.as_deref() {
                    Some("always" | "madvise") => (
                        true,
                        huge,
                        format!(
                            "MADV_HUGEPAGE; {THP}/enabled is {}{reclaimed}",
                            anon_thp.as_deref().unwrap_or("")
                        ),
                    ),
                    other => (
                        false,
                        base,
                        format!(
                            "{THP}/enabled is {}, so anonymous memory gets no transparent huge pages",
                            other.unwrap_or("missing")
                        ),
                    ),
                },
                Backing::MemfdThp => match shmem_thp.as_deref() {
                    Some("always" | "within_size" | "advise" | "force") => (
                        true,
                        huge,
                        format!(
                            "MADV_HUGEPAGE on shmem; {THP}/shmem_enabled is {}{reclaimed}",
                            shmem_thp.as_deref().unwrap_or("")
                        ),
                    ),
                    other => (
                        false,
                        base,
                        format!(
                            "{THP}/shmem_enabled is {}, so shmem gets no transparent huge pages",
                            other.unwrap_or("missing")
                        ),
                    ),
                },
                Backing::Hugetlb => (
                    free > 0,
                    hpage,
                    format!(
                        "{free} free hugetlb pages of {} KiB (vm.nr_hugepages reserves them)",
                        hpage >> 10
                    ),
                ),
            };
            Offer {
                backing,
                available,
                page_size,
                reason,
            }
        })
        .collect()
}

/// The fastest backing to fill that the host offers for `size` bytes
/// (`hugetlb` only when its free pool holds them all).
pub fn fastest_for(size: usize) -> Backing {
    fill_order()
        .into_iter()
        .find(|&b| check_offer(b, size).is_ok())
        .unwrap_or(Backing::Memfd)
}

/// A mapping of guest memory and, for fd-backed memory, its file.
pub struct Mapping {
    pub fd: Option<File>,
    pub base: NonNull<u8>,
    pub len: usize,
    /// The unit the kernel allocates this mapping in when it can.
    pub alloc_page_size: usize,
}

fn check_offer(backing: Backing, size: usize) -> CoreResult<Offer> {
    let offer = offers()
        .into_iter()
        .find(|o| o.backing == backing)
        .expect("every backing has an offer");
    if !offer.available {
        return Err(CoreError::Unsupported(format!(
            "memory backing {}: {}",
            backing.name(),
            offer.reason
        )));
    }
    if backing == Backing::Hugetlb {
        let (hpage, free) = hugetlb_pool();
        if !size.is_multiple_of(hpage) {
            return Err(CoreError::invalid(format!(
                "memory backing hugetlb: size {size} is not a multiple of the huge page size {hpage}"
            )));
        }
        if size / hpage > free {
            return Err(CoreError::Unsupported(format!(
                "memory backing hugetlb: {size} bytes need {} free huge pages of {} KiB, the \
                 host has {free} (raise vm.nr_hugepages)",
                size / hpage,
                hpage >> 10
            )));
        }
    }
    Ok(offer)
}

/// Maps `size` bytes (a multiple of the base page size) of zeroed memory.
pub fn map(size: usize, backing: Backing) -> CoreResult<Mapping> {
    let offer = check_offer(backing, size)?;
    let prot = ProtFlags::READ | ProtFlags::WRITE;
    let (fd, ptr) = if backing.has_fd() {
        let flags = match backing {
            Backing::Hugetlb => MemfdFlags::CLOEXEC | MemfdFlags::HUGETLB,
            _ => MemfdFlags::CLOEXEC,
        };
        let fd = memfd_create("mig-guest", flags)
            .map_err(|e| CoreError::io("memfd_create", e.into()))?;
        ftruncate(&fd, size as u64).map_err(|e| CoreError::io("ftruncate memfd", e.into()))?;
        // SAFETY: a fresh shared mapping of a file we own, of exactly its
        // size; the kernel picks the address, so nothing else is overlapped.
        let ptr = unsafe { mmap(std::ptr::null_mut(), size, prot, MapFlags::SHARED, &fd, 0) }
            .map_err(|e| CoreError::io(format!("mmap {size} bytes"), e.into()))?;
        (Some(File::from(fd)), ptr)
    } else {
        // SAFETY: a fresh private anonymous mapping at an address the
        // kernel picks.
        let ptr = unsafe { mmap_anonymous(std::ptr::null_mut(), size, prot, MapFlags::PRIVATE) }
            .map_err(|e| CoreError::io(format!("mmap {size} anonymous bytes"), e.into()))?;
        (None, ptr)
    };
    let advice = match backing {
        Backing::MemfdThp | Backing::AnonThp => Some((Advice::LinuxHugepage, "MADV_HUGEPAGE")),
        // Base pages as asked, even where THP is `always`.
        Backing::Anon => Some((Advice::LinuxNoHugepage, "MADV_NOHUGEPAGE")),
        _ => None,
    };
    if let Some((advice, name)) = advice {
        // SAFETY: advice on the mapping just created, which nothing else uses.
        if let Err(e) = unsafe { madvise(ptr, size, advice) } {
            // SAFETY: unmaps what was mapped above.
            let _ = unsafe { munmap(ptr, size) };
            return Err(CoreError::Unsupported(format!(
                "memory backing {}: {name}: {}",
                backing.name(),
                std::io::Error::from(e)
            )));
        }
    }
    let base = NonNull::new(ptr.cast::<u8>())
        .ok_or_else(|| CoreError::invalid("mmap returned a null mapping"))?;
    Ok(Mapping {
        fd,
        base,
        len: size,
        alloc_page_size: offer.page_size,
    })
}

/// Bytes of `[base, base + len)` the kernel currently backs with huge pages
/// (transparent or hugetlb), from `/proc/self/smaps`: what a mapping
/// actually got, as opposed to what it asked for.
pub fn huge_bytes(base: usize, len: usize) -> usize {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let end = base + len;
    let mut inside = false;
    let mut total = 0usize;
    for line in smaps.lines() {
        let head = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = head.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = lo < end && hi > base;
                continue;
            }
        }
        if !inside {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if matches!(
            key,
            "AnonHugePages" | "ShmemPmdMapped" | "Shared_Hugetlb" | "Private_Hugetlb"
        ) {
            let kb = value.trim().trim_end_matches("kB").trim();
            total += kb.parse::<usize>().unwrap_or(0) << 10;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for b in FASTEST_FIRST {
            assert_eq!(Backing::parse(b.name()).unwrap(), b);
        }
        let e = Backing::parse("tmpfs").unwrap_err().to_string();
        assert!(e.contains("tmpfs") && e.contains("anon-thp"), "{e}");
        assert!(offers()
            .iter()
            .any(|o| o.backing == Backing::Memfd && o.available));
        let auto = Backing::choose("auto", 64 << 20).unwrap();
        assert!(offers().iter().any(|o| o.backing == auto && o.available));
    }

    #[test]
    fn anon_thp_gets_huge_pages_where_the_host_offers_them() {
        let huge = thp_size();
        let offer = offers()
            .into_iter()
            .find(|o| o.backing == Backing::AnonThp)
            .unwrap();
        if !offer.available {
            eprintln!("skipping: host offers no anonymous THP: {}", offer.reason);
            return;
        }
        let m = map(8 * huge, Backing::AnonThp).unwrap();
        // SAFETY: the mapping is ours and 8 huge pages long.
        unsafe { std::ptr::write_bytes(m.base.as_ptr(), 1, m.len) };
        let got = huge_bytes(m.base.as_ptr() as usize, m.len);
        // SAFETY: unmaps the mapping created above.
        unsafe { munmap(m.base.as_ptr().cast(), m.len).unwrap() };
        // Memory pressure may deny some huge pages, never all of them here.
        assert!(got > 0, "no huge pages in an anon-thp mapping");
    }
}
