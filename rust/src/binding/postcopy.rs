//! `mig._mig.PostcopyRegion` and the post-copy entry of `capabilities()`.

use std::time::Duration;

use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyDict;

use super::memory::PyGuestMemory;
use crate::postcopy::capability::PostcopyCapability;
use crate::postcopy::placement::PlacementMode;
use crate::postcopy::placer::Placement;
use crate::postcopy::{PostcopyRegion, RegionStats};

#[pyclass(name = "PostcopyRegion", module = "mig._mig", frozen)]
pub struct PyPostcopyRegion {
    inner: std::sync::Arc<PostcopyRegion>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(super) fn stats_dict<'py>(py: Python<'py>, s: &RegionStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("postcopy-requests", s.requests)?;
    d.set_item("postcopy-faults", s.faults)?;
    d.set_item("pages-placed", s.placer.pages_placed)?;
    d.set_item("zero-pages-placed", s.placer.zero_pages_placed)?;
    d.set_item("already-present", s.placer.already_present)?;
    d.set_item("pages-discarded", s.discarded)?;
    d.set_item("faults-resolved", s.blocktime.resolved)?;
    d.set_item("fault-latency-p50", s.blocktime.latency_p50.map(ms))?;
    d.set_item("fault-latency-p99", s.blocktime.latency_p99.map(ms))?;
    d.set_item("postcopy-blocktime", s.blocktime.all_blocked.map(ms))?;
    let per = PyDict::new(py);
    for (tid, t) in &s.blocktime.per_thread {
        per.set_item(tid, ms(*t))?;
    }
    d.set_item("postcopy-vcpu-blocktime", per)?;
    d.set_item("kernel-faults", s.kernel_faults)?;
    d.set_item("thread-ids", s.thread_ids)?;
    d.set_item("postcopy-placement", s.placement)?;
    Ok(d)
}

#[pymethods]
impl PyPostcopyRegion {
    /// `vcpus`: the number of guest threads, for `postcopy-blocktime` (the
    /// time all of them were blocked at once); 0 if unknown.
    /// `placement`: `copy`, or `continue` for memfd/shmem memory (`auto`
    /// is the shmem default).
    #[new]
    #[pyo3(signature = (vcpus = 0, placement = "copy"))]
    fn new(vcpus: usize, placement: &str) -> PyResult<Self> {
        let mode = PlacementMode::choose(placement, crate::backing::Backing::Memfd)?;
        Ok(PyPostcopyRegion {
            inner: std::sync::Arc::new(PostcopyRegion::new(vcpus, None, mode)),
        })
    }

    /// Registers `memory` for missing-page faults, then discards the stale
    /// `(start_page, n)` ranges; starts the fault thread.
    #[pyo3(signature = (memory, discard = Vec::new()))]
    fn register(
        &self,
        py: Python<'_>,
        memory: &Bound<'_, PyGuestMemory>,
        discard: Vec<(u64, u64)>,
    ) -> PyResult<()> {
        let mem = memory.get().inner.clone();
        let r = self.inner.clone();
        Ok(py.detach(move || r.register(mem, &discard))?)
    }

    /// Places one page atomically; False if it was already present.
    fn place(&self, py: Python<'_>, page: u64, data: PyBackedBytes) -> PyResult<bool> {
        let r = self.inner.clone();
        let p = py.detach(move || r.place(page, &data))?;
        Ok(p == Placement::Placed)
    }

    /// Places whole pages of `data` from `first` (one `UFFDIO_CONTINUE` per
    /// run with `continue`); returns the pages placed.
    fn place_run(&self, py: Python<'_>, first: u64, data: PyBackedBytes) -> PyResult<u64> {
        let r = self.inner.clone();
        Ok(py.detach(move || r.place_run(first, &data))?)
    }

    /// Places zeros at the `n` pages from `first` (one ioctl per run of
    /// missing pages); returns the pages placed.
    fn place_zero_range(&self, py: Python<'_>, first: u64, n: u64) -> PyResult<u64> {
        let r = self.inner.clone();
        Ok(py.detach(move || r.place_zero_range(first, n))?)
    }

    /// Places a page of zeros; False if it was already present.
    fn place_zero(&self, py: Python<'_>, page: u64) -> PyResult<bool> {
        let r = self.inner.clone();
        let p = py.detach(move || r.place_zero(page))?;
        Ok(p == Placement::Placed)
    }

    /// Pages the guest is waiting for that were not requested before:
    /// waits up to `timeout` seconds for the first, then takes all queued.
    #[pyo3(signature = (timeout = 0.0))]
    fn next_requests(&self, py: Python<'_>, timeout: f64) -> PyResult<Vec<u64>> {
        let t = Duration::try_from_secs_f64(timeout).map_err(|_| {
            pyo3::exceptions::PyValueError::new_err(format!("bad timeout {timeout}"))
        })?;
        let r = self.inner.clone();
        let reqs = py.detach(move || r.next_requests(t))?;
        Ok(reqs.into_iter().map(|q| q.page).collect())
    }

    /// Whether `page` has been placed through this region.
    fn is_placed(&self, page: u64) -> PyResult<bool> {
        Ok(self.inner.is_placed(page)?)
    }

    /// Requests, placements, fault latency (ms) and blocktime (ms).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = self.inner.clone();
        let s = py.detach(move || r.stats());
        stats_dict(py, &s)
    }

    #[getter]
    fn registered(&self) -> bool {
        self.inner.is_registered()
    }

    /// Stops the fault thread and unregisters; threads still blocked on a
    /// missing page then read it as zeros.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let r = self.inner.clone();
        Ok(py.detach(move || r.close())?)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: &Bound<'_, PyAny>,
        _exc: &Bound<'_, PyAny>,
        _tb: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.close(py)
    }

    fn __repr__(&self) -> String {
        format!(
            "PostcopyRegion(registered={}, placement={})",
            self.inner.is_registered(),
            self.inner.mode().name()
        )
    }
}

/// The `postcopy` entry of `capabilities()`.
pub fn capability_dict<'py>(
    py: Python<'py>,
    c: &PostcopyCapability,
) -> PyResult<Bound<'py, PyDict>> {
    let d = super::tracker::capability_dict(py, &c.cap)?;
    d.set_item("kernel_faults", c.kernel_faults)?;
    d.set_item("kernel_faults_note", &c.kernel_faults_note)?;
    d.set_item("thread_ids", c.thread_id)?;
    d.set_item(
        "placement_continue",
        super::tracker::capability_dict(py, &c.minor)?,
    )?;
    Ok(d)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPostcopyRegion>()
}
