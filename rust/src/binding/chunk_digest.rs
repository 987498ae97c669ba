//! `mig._mig.ChunkDigest` and `digest_frozen`: the order-independent memory
//! digest (see `chunk_digest.rs`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::memory::PyGuestMemory;
use crate::chunk_digest::{self, ChunkDigest, Rehasher, Throttle};

/// The thread count for a whole-memory digest: the default when `None`.
pub(super) fn threads(t: Option<usize>) -> PyResult<usize> {
    match t {
        None => Ok(chunk_digest::default_threads()),
        Some(n @ 1..=256) => Ok(n),
        Some(n) => Err(PyValueError::new_err(format!(
            "threads must be 1..=256, not {n}"
        ))),
    }
}

/// The chunk root of all of `memory`, read in full with `threads` threads;
/// `chunk_bytes` other than the default is for measurements only.
#[pyfunction]
#[pyo3(signature = (memory, threads=None, chunk_bytes=None))]
fn digest_frozen(
    py: Python<'_>,
    memory: &Bound<'_, PyGuestMemory>,
    threads: Option<usize>,
    chunk_bytes: Option<usize>,
) -> PyResult<u128> {
    let mem = memory.get().inner.clone();
    let threads = self::threads(threads)?;
    let chunk = chunk_bytes.unwrap_or(chunk_digest::CHUNK_BYTES);
    Ok(py.detach(move || chunk_digest::digest_frozen_with(&mem, threads, chunk))?)
}

/// A digest of a memory kept current by `mark_written`; `root()` rehashes
/// only the chunks written since their last hash.
#[pyclass(name = "ChunkDigest", module = "mig._mig", frozen)]
pub struct PyChunkDigest {
    inner: Arc<ChunkDigest>,
    rehasher: Mutex<Option<Rehasher>>,
}

#[pymethods]
impl PyChunkDigest {
    #[new]
    #[pyo3(signature = (memory, chunk_bytes=None))]
    fn new(
        py: Python<'_>,
        memory: &Bound<'_, PyGuestMemory>,
        chunk_bytes: Option<usize>,
    ) -> PyResult<Self> {
        let mem = memory.get().inner.clone();
        let chunk = chunk_bytes.unwrap_or(chunk_digest::CHUNK_BYTES);
        let inner = py.detach(move || ChunkDigest::with_chunk(mem, chunk))?;
        Ok(PyChunkDigest {
            inner: Arc::new(inner),
            rehasher: Mutex::new(None),
        })
    }

    #[getter]
    fn chunk_bytes(&self) -> usize {
        self.inner.chunk_bytes()
    }

    #[getter]
    fn chunks(&self) -> usize {
        self.inner.chunks()
    }

    /// Chunks written since their last hash.
    #[getter]
    fn stale_chunks(&self) -> usize {
        self.inner.stale_chunks()
    }

    /// Records that pages `[first, first + count)` were written (after the
    /// write).
    #[pyo3(signature = (first, count=1))]
    fn mark_written(&self, first: usize, count: usize) -> PyResult<()> {
        Ok(self.inner.mark_written(first, count)?)
    }

    /// The root now, rehashing only the stale chunks.
    fn root(&self, py: Python<'_>) -> u128 {
        let d = self.inner.clone();
        py.detach(move || d.root())
    }

    /// `root()` with what it took: `root`, `rehashed-chunks`,
    /// `rehashed-bytes` (memory read), `seconds`.
    fn root_timed<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = self.inner.clone();
        let (root, work) = py.detach(move || d.root_timed());
        let out = PyDict::new(py);
        out.set_item("root", root)?;
        out.set_item("rehashed-chunks", work.chunks)?;
        out.set_item("rehashed-bytes", work.bytes)?;
        out.set_item("seconds", work.seconds)?;
        Ok(out)
    }

    /// One background step, run here: rehashes up to `limit` settled chunks.
    fn rehash_settled(&self, py: Python<'_>, limit: usize) -> usize {
        let d = self.inner.clone();
        py.detach(move || d.rehash_settled(limit))
    }

    /// Starts the background rehasher (restarts it if running).
    #[pyo3(signature = (period=0.02, batch=16, duty=0.5))]
    fn start_rehasher(&self, py: Python<'_>, period: f64, batch: usize, duty: f64) -> PyResult<()> {
        if !(period.is_finite() && (0.0..=10.0).contains(&period)) {
            return Err(PyValueError::new_err("period must be 0..=10 seconds"));
        }
        if !(duty > 0.0 && duty <= 1.0) || batch == 0 {
            return Err(PyValueError::new_err(
                "duty must be in (0, 1] and batch > 0",
            ));
        }
        let throttle = Throttle {
            period: Duration::from_secs_f64(period),
            batch,
            duty,
        };
        self.stop_rehasher(py);
        let r = Rehasher::start(self.inner.clone(), throttle)?;
        *self.rehasher.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        Ok(())
    }

    fn stop_rehasher(&self, py: Python<'_>) {
        let r = self
            .rehasher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        py.detach(move || drop(r));
    }

    fn __repr__(&self) -> String {
        format!(
            "ChunkDigest(chunks={}, chunk_bytes={}, stale_chunks={})",
            self.inner.chunks(),
            self.inner.chunk_bytes(),
            self.inner.stale_chunks()
        )
    }
}

/// Marks pages `[0, pages)` written in calls of `run` pages each, as the
/// receive path marks every run of pages it stores. For benchmarks.
#[pyfunction]
fn mark_pages(
    py: Python<'_>,
    digest: &Bound<'_, PyChunkDigest>,
    pages: usize,
    run: usize,
) -> PyResult<()> {
    if run == 0 {
        return Err(PyValueError::new_err("run must be at least one page"));
    }
    let d = digest.get().inner.clone();
    Ok(py.detach(move || -> crate::CoreResult<()> {
        for first in (0..pages).step_by(run) {
            d.mark_written(first, run.min(pages - first))?;
        }
        Ok(())
    })?)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyChunkDigest>()?;
    m.add_function(wrap_pyfunction!(digest_frozen, m)?)?;
    m.add_function(wrap_pyfunction!(mark_pages, m)?)
}
