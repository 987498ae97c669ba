//! `mig._mig.GuestMemory`.

use std::path::PathBuf;
use std::sync::Arc;

use numpy::ndarray::ArrayViewMut1;
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::backing::{self, Backing};
use crate::chunk_digest;
use crate::memory::GuestMemory;

#[pyclass(name = "GuestMemory", module = "mig._mig", frozen)]
pub struct PyGuestMemory {
    pub inner: Arc<GuestMemory>,
}

#[pymethods]
impl PyGuestMemory {
    #[new]
    #[pyo3(signature = (size, backing="memfd"))]
    fn new(py: Python<'_>, size: usize, backing: &str) -> PyResult<Self> {
        let backing = Backing::choose(backing, size)?;
        let inner = py.detach(|| GuestMemory::with_backing(size, backing))?;
        Ok(PyGuestMemory {
            inner: Arc::new(inner),
        })
    }

    /// Loads a raw memory image.
    #[staticmethod]
    #[pyo3(signature = (path, backing="memfd"))]
    fn from_image(py: Python<'_>, path: PathBuf, backing: &str) -> PyResult<Self> {
        let size = std::fs::metadata(&path).map_or(0, |m| m.len() as usize);
        let backing = Backing::choose(backing, size)?;
        let inner = py.detach(|| GuestMemory::from_image(&path, backing))?;
        Ok(PyGuestMemory {
            inner: Arc::new(inner),
        })
    }

    /// Saves the whole memory as a raw image.
    fn to_image(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let mem = self.inner.clone();
        Ok(py.detach(move || mem.to_image(&path))?)
    }

    #[getter]
    fn size(&self) -> usize {
        self.inner.len()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    #[getter]
    fn page_size(&self) -> usize {
        self.inner.page_size()
    }

    #[getter]
    fn num_pages(&self) -> usize {
        self.inner.num_pages()
    }

    /// The memfd, or None for anonymous memory.
    #[getter]
    fn fd(&self) -> Option<i32> {
        self.inner.fd()
    }

    /// The backing this memory got: memfd, memfd-thp, anon, anon-thp or
    /// hugetlb.
    #[getter]
    fn backing(&self) -> &'static str {
        self.inner.backing().name()
    }

    /// The unit the kernel allocates this memory in when it can (the huge
    /// page size for the THP and hugetlb backings).
    #[getter]
    fn backing_page_size(&self) -> usize {
        self.inner.alloc_page_size()
    }

    /// Bytes the kernel backs with huge pages right now.
    fn huge_bytes(&self, py: Python<'_>) -> usize {
        let mem = self.inner.clone();
        py.detach(move || mem.huge_bytes())
    }

    /// Allocates and zeroes `[offset, offset + len)` now
    /// (MADV_POPULATE_WRITE), without changing pages already present.
    #[pyo3(signature = (offset=0, len=None))]
    fn populate(&self, py: Python<'_>, offset: usize, len: Option<usize>) -> PyResult<()> {
        let mem = self.inner.clone();
        let len = len.unwrap_or(mem.len().saturating_sub(offset));
        Ok(py.detach(move || mem.populate(offset, len))?)
    }

    /// Byte ranges that may hold data now; the rest reads as zeros (holes,
    /// found without touching them: `docs/memory.md`).
    fn data_ranges(&self, py: Python<'_>) -> Vec<(usize, usize)> {
        let mem = self.inner.clone();
        py.detach(move || mem.data_ranges())
    }

    /// A writable uint8 numpy view of the whole memory, without a copy. The
    /// view keeps the memory alive.
    #[getter]
    fn array<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let mem = &slf.get().inner;
        // SAFETY: the mapping is valid for `len` bytes for as long as `mem`
        // lives, and the array holds `slf` as its base object, which owns an
        // Arc of the mapping. Concurrent writers are inherent to guest memory
        // and numpy readers see plain bytes.
        let view = unsafe { ArrayViewMut1::from_shape_ptr(mem.len(), mem.as_ptr()) };
        // SAFETY: as above; `slf` is the container that keeps the data alive.
        let arr = unsafe { PyArray1::borrow_from_array(&view, slf.clone().into_any()) };
        arr.readwrite();
        Ok(arr)
    }

    /// The memory digest: without a range, the chunk root of all of memory
    /// (`chunk_digest`, the digest the end records carry), read in full with
    /// `threads` threads (default: the host's cores, at most four). With
    /// `first`/`count`, the plain xxh3-128 of the bytes of those pages.
    #[pyo3(signature = (first=None, count=None, threads=None))]
    fn digest(
        &self,
        py: Python<'_>,
        first: Option<usize>,
        count: Option<usize>,
        threads: Option<usize>,
    ) -> PyResult<u128> {
        let mem = self.inner.clone();
        if first.is_none() && count.is_none() {
            let threads = super::chunk_digest::threads(threads)?;
            return Ok(py.detach(move || chunk_digest::digest_frozen(&mem, threads)));
        }
        if threads.is_some() {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "threads applies to the whole-memory digest, not to a page range",
            ));
        }
        let first = first.unwrap_or(0);
        let count = count.unwrap_or(mem.num_pages().saturating_sub(first));
        Ok(py.detach(move || mem.digest_pages(first, count))?)
    }

    /// Copies `len` bytes at `offset` out of guest memory.
    fn read(&self, py: Python<'_>, offset: usize, len: usize) -> PyResult<Vec<u8>> {
        if len > self.inner.len() {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "read of {len} bytes exceeds guest memory of {} bytes",
                self.inner.len()
            )));
        }
        let mut out = vec![0u8; len];
        let mem = self.inner.clone();
        py.detach(|| mem.read_bytes(offset, &mut out))?;
        Ok(out)
    }

    /// Copies `data` into guest memory at `offset`.
    fn write(&self, py: Python<'_>, offset: usize, data: &[u8]) -> PyResult<()> {
        let mem = self.inner.clone();
        Ok(py.detach(|| mem.write_bytes(offset, data))?)
    }

    fn __repr__(&self) -> String {
        format!(
            "GuestMemory(size={}, page_size={}, backing={:?}, fd={})",
            self.inner.len(),
            self.inner.page_size(),
            self.inner.backing().name(),
            self.inner
                .fd()
                .map_or_else(|| "None".to_string(), |fd| fd.to_string())
        )
    }
}

/// xxh3-128 digest of a contiguous uint8 array, without the GIL.
#[pyfunction]
fn digest_bytes(py: Python<'_>, data: PyReadonlyArray1<'_, u8>) -> PyResult<u128> {
    if !data.is_contiguous() {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "digest_bytes needs a contiguous uint8 array",
        ));
    }
    let bytes = data.as_slice()?;
    Ok(py.detach(|| crate::memory::digest_bytes(bytes)))
}

/// What the host offers for each memory backing, fastest to fill first:
/// a list of {"backing", "available", "page-size", "reason"}.
#[pyfunction]
fn memory_backings(py: Python<'_>) -> PyResult<Vec<Bound<'_, pyo3::types::PyDict>>> {
    use pyo3::types::PyDict;
    backing::offers()
        .into_iter()
        .map(|o| {
            let d = PyDict::new(py);
            d.set_item("backing", o.backing.name())?;
            d.set_item("available", o.available)?;
            d.set_item("page-size", o.page_size)?;
            d.set_item("reason", o.reason)?;
            Ok(d)
        })
        .collect()
}

/// The fastest backing to fill that the host offers for `size` bytes (what
/// "auto" picks).
#[pyfunction]
fn fastest_backing(size: usize) -> &'static str {
    backing::fastest_for(size).name()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyGuestMemory>()?;
    m.add_function(wrap_pyfunction!(memory_backings, m)?)?;
    m.add_function(wrap_pyfunction!(fastest_backing, m)?)?;
    m.add_function(wrap_pyfunction!(digest_bytes, m)?)
}
