//! `mig._mig.RamStream`: the RAM stream with every call's work done with
//! the GIL released.
//!
//! A native `DirtyTracker` and a native `Sender` are used directly. Any other
//! tracker (an object with `sync() -> DirtyBitmap`) or link (an object with
//! `send_pages(bitmap, generation)` and `sync(generation)`), such as the
//! simulator's, is called back through the adapters below, with the GIL
//! taken for the call only; the pass and generation logic stays the same.

use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::bitmap::PyDirtyBitmap;
use super::stream::PySender;
use super::tracker::PyDirtyTracker;
use crate::bitmap::DirtyBitmap;
use crate::error::{CoreError, CoreResult};
use crate::ram_stream::{Completion, Harvest, PageSink, RamStream, SyncReport};

/// The first Python exception a callback raised, re-raised as itself once
/// the stream call returns (the core only sees that the callback failed).
#[derive(Clone, Default)]
struct Raised(Arc<Mutex<Option<PyErr>>>);

impl Raised {
    fn keep(&self, e: PyErr) -> CoreError {
        let msg = e.to_string();
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
        CoreError::invalid(format!("a Python callback of the RAM stream failed: {msg}"))
    }

    /// The kept exception if there is one, else the core error.
    fn or_core(&self, e: CoreError) -> PyErr {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| e.into())
    }
}

/// A Python tracker: `sync()` returns a `DirtyBitmap`; its optional
/// `last_sync_seconds` is the harvest's cost.
struct PyHarvest {
    tracker: Py<PyAny>,
    raised: Raised,
}

impl Harvest for PyHarvest {
    fn harvest(&mut self) -> CoreResult<(DirtyBitmap, Option<f64>)> {
        Python::attach(|py| {
            let t = self.tracker.bind(py);
            let run = || -> PyResult<(DirtyBitmap, Option<f64>)> {
                let new = t.call_method0("sync")?;
                let bm = new.cast::<PyDirtyBitmap>()?.get().lock().clone();
                let cost = match t.getattr("last_sync_seconds") {
                    Ok(v) if !v.is_none() => Some(v.extract::<f64>()?),
                    _ => None,
                };
                Ok((bm, cost))
            };
            run().map_err(|e| self.raised.keep(e))
        })
    }

    fn close(&mut self) {
        Python::attach(|py| {
            let t = self.tracker.bind(py);
            if let Ok(close) = t.getattr("close") {
                if close.is_callable() {
                    if let Err(e) = close.call0() {
                        self.raised.keep(e);
                    }
                }
            }
        });
    }
}

/// A Python link: pages go as a `DirtyBitmap` per chunk.
struct PyLink {
    link: Py<PyAny>,
    num_pages: usize,
    raised: Raised,
}

impl PageSink for PyLink {
    fn send(&mut self, pages: &[u64], generation: u64) -> CoreResult<u64> {
        let bm = DirtyBitmap::from_indices(pages, self.num_pages)?;
        Python::attach(|py| {
            let run = || -> PyResult<u64> {
                let bm = Bound::new(py, PyDirtyBitmap::wrap(bm))?;
                let n = self
                    .link
                    .bind(py)
                    .call_method1("send_pages", (bm, generation))?;
                Ok(if n.is_none() { 0 } else { n.extract()? })
            };
            run().map_err(|e| self.raised.keep(e))
        })
    }

    fn sync(&mut self, generation: u64) -> CoreResult<u64> {
        Python::attach(|py| {
            let run = || -> PyResult<u64> {
                let n = self.link.bind(py).call_method1("sync", (generation,))?;
                Ok(if n.is_none() { 0 } else { n.extract()? })
            };
            run().map_err(|e| self.raised.keep(e))
        })
    }
}

/// Guest RAM from a tracker to a link, one chunk per call.
#[pyclass(name = "RamStream", module = "mig._mig", frozen)]
pub struct PyRamStream {
    inner: Arc<Mutex<RamStream>>,
    raised: Raised,
}

impl PyRamStream {
    /// Runs `f` on the stream with the GIL released; a Python exception a
    /// callback raised comes back as itself.
    fn run<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut RamStream) -> CoreResult<R> + Send,
    ) -> PyResult<R> {
        let inner = self.inner.clone();
        // Locked inside `detach`: a thread waiting for the lock never holds
        // the GIL a callback of the holder needs.
        let out = py
            .detach(move || f(&mut lock(&inner)))
            .map_err(|e| self.raised.or_core(e))?;
        match self
            .raised
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

fn lock(m: &Mutex<RamStream>) -> MutexGuard<'_, RamStream> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn report_tuple(r: SyncReport) -> (u64, f64) {
    (r.new_pages, r.seconds)
}

#[pymethods]
impl PyRamStream {
    /// `tracker`: a native `DirtyTracker` or any object with `sync()`.
    #[new]
    fn new(num_pages: usize, page_size: u64, tracker: &Bound<'_, PyAny>) -> PyResult<Self> {
        if page_size == 0 {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "page_size must be positive",
            ));
        }
        let raised = Raised::default();
        let harvest: Box<dyn Harvest> = match tracker.cast::<PyDirtyTracker>() {
            Ok(t) => {
                let native = t.get().inner.clone();
                if native.num_pages() != num_pages {
                    return Err(pyo3::exceptions::PyValueError::new_err(format!(
                        "the tracker covers {} pages, the stream {num_pages}",
                        native.num_pages()
                    )));
                }
                Box::new(native)
            }
            Err(_) => Box::new(PyHarvest {
                tracker: tracker.clone().unbind(),
                raised: raised.clone(),
            }),
        };
        Ok(PyRamStream {
            inner: Arc::new(Mutex::new(RamStream::new(num_pages, page_size, harvest))),
            raised,
        })
    }

    /// Connects the send path (a native `Sender`, or any object with
    /// `send_pages` and `sync`); every page becomes known dirty.
    fn start(&self, py: Python<'_>, link: &Bound<'_, PyAny>) -> PyResult<()> {
        let num_pages = self.num_pages(py)?;
        let sink: Box<dyn PageSink> = match link.cast::<PySender>() {
            Ok(s) => Box::new(s.get().inner.clone()),
            Err(_) => Box::new(PyLink {
                link: link.clone().unbind(),
                num_pages,
                raised: self.raised.clone(),
            }),
        };
        self.run(py, move |s| {
            s.start(sink);
            Ok(())
        })
    }

    /// Closes the generation if pages went out in it, then merges the
    /// tracker's harvest. Returns (the new pages as a bitmap, their count,
    /// the harvest's cost in seconds).
    fn sync(&self, py: Python<'_>) -> PyResult<(PyDirtyBitmap, u64, f64)> {
        let (new, report) = self.run(py, |s| s.sync())?;
        Ok((PyDirtyBitmap::wrap(new), report.new_pages, report.seconds))
    }

    /// Post-copy's hand-over: a final harvest, then the known set taken
    /// out unsent. Returns (those pages, the harvest's new pages, its cost).
    fn take_known(&self, py: Python<'_>) -> PyResult<(PyDirtyBitmap, u64, f64)> {
        let (taken, report) = self.run(py, |s| s.take_known())?;
        Ok((PyDirtyBitmap::wrap(taken), report.new_pages, report.seconds))
    }

    /// Sends about `budget` bytes of known pages; returns the wire bytes.
    fn iterate(&self, py: Python<'_>, budget: u64) -> PyResult<u64> {
        self.run(py, move |s| s.iterate(budget))
    }

    /// Final harvest, then every known page and the closing barrier.
    /// Returns (wire bytes or None when over `budget`, bytes known,
    /// (new pages, harvest seconds)); over budget nothing is sent.
    #[pyo3(signature = (budget=None))]
    fn complete(
        &self,
        py: Python<'_>,
        budget: Option<u64>,
    ) -> PyResult<(Option<u64>, u64, (u64, f64))> {
        let (outcome, report) = self.run(py, move |s| s.complete(budget))?;
        Ok(match outcome {
            Completion::Sent(bytes) => (Some(bytes), bytes, report_tuple(report)),
            Completion::OverBudget { remaining } => (None, remaining, report_tuple(report)),
        })
    }

    /// Bytes of known dirty pages not yet sent (no harvest).
    fn pending(&self, py: Python<'_>) -> PyResult<u64> {
        self.run(py, |s| Ok(s.pending()))
    }

    #[getter]
    fn generation(&self, py: Python<'_>) -> PyResult<u64> {
        self.run(py, |s| Ok(s.generation()))
    }

    #[getter]
    fn num_pages(&self, py: Python<'_>) -> PyResult<usize> {
        self.run(py, |s| Ok(s.num_pages()))
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let st = self.run(py, |s| Ok(s.stats()))?;
        let d = PyDict::new(py);
        d.set_item("pages-sent", st.pages_sent)?;
        d.set_item("bytes-sent", st.bytes_sent)?;
        d.set_item("wire-bytes", st.wire_bytes)?;
        d.set_item("precopy-bytes", st.precopy_bytes)?;
        d.set_item("downtime-bytes", st.downtime_bytes)?;
        d.set_item("final-pages", st.final_pages)?;
        d.set_item("dirty-sync-count", st.sync_count)?;
        d.set_item("last-sync-new-pages", st.last_sync_new_pages)?;
        Ok(d)
    }

    /// No more syncs: releases the tracker.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.run(py, |s| {
            s.close();
            Ok(())
        })
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRamStream>()
}
