//! `mig._mig.PostcopyOutgoing` (source) and `PostcopyIncoming`
//! (destination): post-copy's page channels around a session's `Sender`,
//! `Listener` and `Receiver`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::bitmap::PyDirtyBitmap;
use super::memory::PyGuestMemory;
use super::postcopy::stats_dict;
use super::stream::{PyListener, PyReceiver, PySender};
use crate::chunk_digest::CHUNK_BYTES;
use crate::error::CoreError;
use crate::postcopy::frames::CHANNELS;
use crate::postcopy::incoming::{read_handover, IncomingState, PostcopyIncoming};
use crate::postcopy::outgoing::{OutgoingState, PostcopyOutgoing};
use crate::postcopy::placement::PlacementMode;
use crate::postcopy::PostcopyRegion;
use crate::transport::Conn;
use crate::wire::ChannelKind;

fn seconds(s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s).map_err(|_| PyValueError::new_err(format!("bad timeout {s}")))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The source's side: owes the destination the chunks holding a page of
/// `owed`, serves requests first and pushes the rest.
#[pyclass(name = "PostcopyOutgoing", module = "mig._mig", frozen)]
pub struct PyPostcopyOutgoing {
    inner: Arc<PostcopyOutgoing>,
    sender: Py<PySender>,
    opened: Mutex<Option<Vec<Conn>>>,
}

#[pymethods]
impl PyPostcopyOutgoing {
    #[new]
    /// `max_bandwidth`: the link, for every chunk; `max_push_bandwidth`:
    /// the background push alone (0 = no further limit); `one_stream`: a
    /// request away from the stream the push follows gets its page alone.
    #[pyo3(signature = (sender, memory, owed, *, max_bandwidth = 0, max_push_bandwidth = 0,
                        one_stream = false))]
    fn new(
        sender: Py<PySender>,
        memory: &Bound<'_, PyGuestMemory>,
        owed: &Bound<'_, PyDirtyBitmap>,
        max_bandwidth: u64,
        max_push_bandwidth: u64,
        one_stream: bool,
    ) -> PyResult<Self> {
        let mem = memory.get().inner.clone();
        let chunk = CHUNK_BYTES.max(mem.page_size());
        let bits = owed
            .get()
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let inner = PostcopyOutgoing::new(
            mem,
            &bits,
            chunk,
            max_bandwidth,
            max_push_bandwidth,
            one_stream,
        )?;
        Ok(PyPostcopyOutgoing {
            inner: Arc::new(inner),
            sender,
            opened: Mutex::new(None),
        })
    }

    /// Opens the two page channels to `uri` (the session's destination).
    fn connect(&self, py: Python<'_>, uri: String) -> PyResult<()> {
        let sender = self.sender.get().inner.clone();
        let conns =
            py.detach(move || sender.connect_extra(&uri, ChannelKind::Postcopy, CHANNELS))?;
        *lock(&self.opened) = Some(conns);
        Ok(())
    }

    /// Names the owed chunks and starts serving and pushing.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        let conns = lock(&self.opened)
            .take()
            .ok_or_else(|| PyValueError::new_err("connect() first"))?;
        let inner = self.inner.clone();
        Ok(py.detach(move || inner.start(conns))?)
    }

    /// After a broken channel: opens new channels to `uri` and goes on with
    /// what the destination still misses.
    fn reconnect(&self, py: Python<'_>, uri: String, timeout: f64) -> PyResult<()> {
        let t = seconds(timeout)?;
        let sender = self.sender.get().inner.clone();
        let inner = self.inner.clone();
        py.detach(move || {
            let conns = sender.connect_extra(&uri, ChannelKind::Postcopy, CHANNELS)?;
            inner.reconnect(conns, t)
        })?;
        Ok(())
    }

    /// Waits up to `timeout` s while active; returns (state, reason):
    /// "active", "placed" or "paused" with why.
    fn wait(&self, py: Python<'_>, timeout: f64) -> PyResult<(&'static str, Option<String>)> {
        let t = seconds(timeout)?;
        let inner = self.inner.clone();
        Ok(match py.detach(move || inner.wait(t)) {
            OutgoingState::Active => ("active", None),
            OutgoingState::Placed => ("placed", None),
            OutgoingState::Paused(why) => ("paused", Some(why)),
        })
    }

    fn set_max_bandwidth(&self, bytes_per_s: u64) {
        self.inner.set_max_bandwidth(bytes_per_s);
    }

    fn set_max_push_bandwidth(&self, bytes_per_s: u64) {
        self.inner.set_max_push_bandwidth(bytes_per_s);
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("postcopy-requests", s.requests)?;
        d.set_item("chunk-pages", self.inner.chunk_pages())?;
        d.set_item("requested-chunks", s.requested_chunks)?;
        d.set_item("requested-pages", s.requested_pages)?;
        d.set_item("pushed-chunks", s.pushed_chunks)?;
        d.set_item("zero-chunks", s.zero_chunks)?;
        d.set_item("owed-chunks", s.owed_chunks)?;
        d.set_item("remaining-chunks", s.remaining_chunks)?;
        d.set_item("postcopy-bytes", s.bytes)?;
        d.set_item("recoveries", s.recoveries)?;
        Ok(d)
    }

    fn close(&self, py: Python<'_>) {
        lock(&self.opened).take();
        let inner = self.inner.clone();
        py.detach(move || inner.close());
    }
}

/// The destination's side: registers `memory` in MISSING mode at `attach`.
#[pyclass(name = "PostcopyIncoming", module = "mig._mig", frozen)]
pub struct PyPostcopyIncoming {
    memory: Py<PyGuestMemory>,
    vcpus: usize,
    placement: PlacementMode,
    inner: Mutex<Option<Arc<PostcopyIncoming>>>,
}

impl PyPostcopyIncoming {
    fn get(&self) -> PyResult<Arc<PostcopyIncoming>> {
        lock(&self.inner)
            .clone()
            .ok_or_else(|| PyValueError::new_err("post-copy is not attached"))
    }
}

fn accept(
    listener: &PyListener,
    receiver: &PyReceiver,
    timeout: Duration,
    io_timeout: Duration,
) -> Result<Vec<Conn>, CoreError> {
    let l = lock(&listener.inner)
        .clone()
        .ok_or_else(|| CoreError::invalid("the listener is closed"))?;
    l.accept_channels(
        ChannelKind::Postcopy,
        receiver.inner.migration_id(),
        CHANNELS,
        timeout,
        io_timeout,
        listener.tls.as_deref(),
    )
}

#[pymethods]
impl PyPostcopyIncoming {
    /// `vcpus`: the guest's threads, for `postcopy-blocktime` (0 = unknown).
    /// `placement`: `postcopy-placement` (`auto`, `copy` or `continue`).
    #[new]
    #[pyo3(signature = (memory, *, vcpus = 0, placement = "auto"))]
    fn new(memory: Py<PyGuestMemory>, vcpus: usize, placement: &str) -> PyResult<Self> {
        let placement = PlacementMode::choose(placement, memory.get().inner.backing())?;
        Ok(PyPostcopyIncoming {
            memory,
            vcpus,
            placement,
            inner: Mutex::new(None),
        })
    }

    /// The placement in use: `copy` or `continue`.
    #[getter]
    fn placement(&self) -> &'static str {
        self.placement.name()
    }

    /// Accepts the source's page channels on `listener`, reads which chunks
    /// it owes, takes their terms out of `receiver`'s digest, registers the
    /// memory (discarding them) and starts. Returns the owed chunks.
    #[pyo3(signature = (listener, receiver, timeout, *, io_timeout = 60.0))]
    fn attach(
        &self,
        py: Python<'_>,
        listener: Py<PyListener>,
        receiver: Py<PyReceiver>,
        timeout: f64,
        io_timeout: f64,
    ) -> PyResult<usize> {
        if lock(&self.inner).is_some() {
            return Err(PyValueError::new_err("post-copy is already attached"));
        }
        let (t, io) = (seconds(timeout)?, seconds(io_timeout)?);
        let mem = self.memory.get().inner.clone();
        let (vcpus, placement) = (self.vcpus, self.placement);
        let inc = py.detach(move || -> Result<PostcopyIncoming, CoreError> {
            let mut conns = accept(listener.get(), receiver.get(), t, io)?;
            let pages = mem.num_pages();
            let handover = read_handover(&mut conns[0], |cp| pages.div_ceil(cp), t)?;
            let (held, chunk_bytes) = receiver.get().inner.held_sum(handover.owed.iter().copied());
            if handover.chunk_pages * mem.page_size() != chunk_bytes {
                return Err(CoreError::invalid(format!(
                    "post-copy: the source's chunks of {} pages differ from the digest's {} bytes",
                    handover.chunk_pages, chunk_bytes
                )));
            }
            let region = Arc::new(PostcopyRegion::new(vcpus, None, placement));
            PostcopyIncoming::start(mem, region, &handover, held, conns)
        })?;
        let owed = inc.stats().owed_chunks as usize;
        *lock(&self.inner) = Some(Arc::new(inc));
        Ok(owed)
    }

    /// After a broken channel: accepts new page channels on `listener`.
    #[pyo3(signature = (listener, receiver, timeout, *, io_timeout = 60.0))]
    fn recover(
        &self,
        py: Python<'_>,
        listener: Py<PyListener>,
        receiver: Py<PyReceiver>,
        timeout: f64,
        io_timeout: f64,
    ) -> PyResult<()> {
        let inc = self.get()?;
        let (t, io) = (seconds(timeout)?, seconds(io_timeout)?);
        py.detach(move || -> Result<(), CoreError> {
            let conns = accept(listener.get(), receiver.get(), t, io)?;
            inc.recover(conns)
        })?;
        Ok(())
    }

    /// Waits up to `timeout` s while active; returns (state, reason):
    /// "active", "complete" or "paused" with why.
    fn wait(&self, py: Python<'_>, timeout: f64) -> PyResult<(&'static str, Option<String>)> {
        let t = seconds(timeout)?;
        let inc = self.get()?;
        Ok(match py.detach(move || inc.wait(t)) {
            IncomingState::Active => ("active", None),
            IncomingState::Complete(_) => ("complete", None),
            IncomingState::Paused(why) => ("paused", Some(why)),
        })
    }

    /// The root of memory as resumed, once every owed chunk is placed.
    #[getter]
    fn root(&self) -> PyResult<Option<u128>> {
        Ok(match self.get()?.state() {
            IncomingState::Complete(r) => Some(r),
            _ => None,
        })
    }

    /// Pages that have not arrived, as `(first page, count)` runs.
    fn missing_pages(&self) -> PyResult<Vec<(u64, u64)>> {
        Ok(self.get()?.missing_pages())
    }

    /// The region's figures (requests, fault latency, blocktime) and the
    /// chunks owed and placed.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let inc = self.get()?;
        let (region, own) = py.detach(|| (inc.region().stats(), inc.stats()));
        let d = stats_dict(py, &region)?;
        d.set_item("owed-chunks", own.owed_chunks)?;
        d.set_item("placed-chunks", own.placed_chunks)?;
        d.set_item("duplicate-chunks", own.duplicate_chunks)?;
        d.set_item("hole-pages", own.hole_pages)?;
        d.set_item("postcopy-bytes", own.bytes)?;
        d.set_item("recoveries", own.recoveries)?;
        Ok(d)
    }

    fn close(&self, py: Python<'_>) {
        if let Some(inc) = lock(&self.inner).clone() {
            py.detach(move || inc.close());
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPostcopyOutgoing>()?;
    m.add_class::<PyPostcopyIncoming>()
}
