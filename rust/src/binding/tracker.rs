//! `mig._mig.DirtyTracker` and `mig._mig.capabilities()`.

use std::sync::Arc;

use numpy::PyReadonlyArray1;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::bitmap::PyDirtyBitmap;
use super::memory::PyGuestMemory;
use crate::tracker::{self, Backend, Capability, DirtyTracker};

#[pyclass(name = "DirtyTracker", module = "mig._mig", frozen)]
pub struct PyDirtyTracker {
    pub(super) inner: Arc<DirtyTracker>,
}

#[pymethods]
impl PyDirtyTracker {
    #[new]
    #[pyo3(signature = (memory, backend = "uffd"))]
    fn new(py: Python<'_>, memory: &Bound<'_, PyGuestMemory>, backend: &str) -> PyResult<Self> {
        let mem = memory.get().inner.clone();
        let backend = Backend::parse(backend)?;
        let inner = py.detach(move || DirtyTracker::new(mem, backend))?;
        Ok(PyDirtyTracker {
            inner: Arc::new(inner),
        })
    }

    /// The pages written since the previous sync (or since creation); they
    /// are write-protected again atomically.
    fn sync(&self, py: Python<'_>) -> PyResult<PyDirtyBitmap> {
        let t = self.inner.clone();
        let bm = py.detach(move || t.sync())?;
        Ok(PyDirtyBitmap::wrap(bm))
    }

    /// The final sync of a switchover, the guest stopped: the pages written
    /// since the previous sync, NOT write-protected again, so a later
    /// `sync()` reports them again (nothing is missed if the guest runs on).
    fn sync_final(&self, py: Python<'_>) -> PyResult<PyDirtyBitmap> {
        let t = self.inner.clone();
        let bm = py.detach(move || t.sync_final())?;
        Ok(PyDirtyBitmap::wrap(bm))
    }

    /// Reports pages as written: a `DirtyBitmap`, a numpy uint64 array of
    /// page indices, or any sequence of ints.
    fn mark(&self, py: Python<'_>, pages: &Bound<'_, PyAny>) -> PyResult<()> {
        if let Ok(bm) = pages.cast::<PyDirtyBitmap>() {
            let snapshot = bm.get().lock().clone();
            let t = self.inner.clone();
            return Ok(py.detach(move || t.mark_bitmap(&snapshot))?);
        }
        if let Ok(arr) = pages.extract::<PyReadonlyArray1<'_, u64>>() {
            if let Ok(slice) = arr.as_slice() {
                let t = self.inner.clone();
                return Ok(py.detach(move || t.mark(slice))?);
            }
        }
        let v: Vec<u64> = pages.extract()?;
        let t = self.inner.clone();
        Ok(py.detach(move || t.mark(&v))?)
    }

    /// Benchmark baseline: the bare PAGEMAP_SCAN harvest of `sync()`
    /// without building a bitmap, in `parts` threads (None: as `sync()`);
    /// returns the written page count. The pages it finds are re-protected
    /// and so not reported by the next `sync()`.
    #[pyo3(signature = (parts = None))]
    fn scan_bare(&self, py: Python<'_>, parts: Option<usize>) -> PyResult<u64> {
        let t = self.inner.clone();
        Ok(py.detach(move || t.scan_bare(parts))?)
    }

    #[getter]
    fn backend(&self) -> &'static str {
        self.inner.backend().name()
    }

    #[getter]
    fn num_pages(&self) -> usize {
        self.inner.num_pages()
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Seconds the last `sync()` took.
    #[getter]
    fn last_sync_seconds(&self) -> f64 {
        self.inner.last_sync().as_secs_f64()
    }

    /// Stops tracking and unregisters the memory from the kernel.
    fn close(&self, py: Python<'_>) {
        let t = self.inner.clone();
        py.detach(move || t.close())
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
    ) {
        self.close(py)
    }

    fn __repr__(&self) -> String {
        format!(
            "DirtyTracker(backend={:?}, num_pages={}, closed={})",
            self.inner.backend().name(),
            self.inner.num_pages(),
            self.inner.is_closed()
        )
    }
}

pub(super) fn capability_dict<'py>(
    py: Python<'py>,
    c: &Capability,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("available", c.available)?;
    d.set_item("reason", &c.reason)?;
    d.set_item("missing", PyList::new(py, &c.missing)?)?;
    Ok(d)
}

/// Which tracker backends work on this host, and why not where they don't;
/// likewise post-copy (userfaultfd MISSING mode).
/// `MIG_FAKE_PROBE` replaces the probed facts (see `docs/tracking.md`).
#[pyfunction]
fn capabilities(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let (caps, postcopy) = py.detach(|| -> crate::CoreResult<_> {
        Ok((
            tracker::capabilities()?,
            crate::postcopy::capability::capability()?,
        ))
    })?;
    let d = PyDict::new(py);
    d.set_item("kernel", &caps.kernel)?;
    d.set_item("faked", caps.faked)?;
    d.set_item("shmem_thp", &caps.shmem_thp)?;
    d.set_item("uffd", capability_dict(py, &caps.uffd)?)?;
    d.set_item("soft", capability_dict(py, &caps.soft)?)?;
    d.set_item("postcopy", super::postcopy::capability_dict(py, &postcopy)?)?;
    Ok(d)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDirtyTracker>()?;
    m.add_function(wrap_pyfunction!(capabilities, m)?)
}
