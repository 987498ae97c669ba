//! `mig._mig.Sender`, `Listener`, `Receiver` and the scan benchmarks'
//! helpers. Every blocking call releases the GIL.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use numpy::PyReadonlyArray1;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::bitmap::PyDirtyBitmap;
use super::memory::PyGuestMemory;
use crate::receiver::{EndCheck, Receiver, ReceiverConfig};
use crate::sender::{self, Sender, SenderConfig};
use crate::transport::{Listener, RefusalHook, TlsConfig};
use crate::wire::Compression;

/// Hands each refused connection to `callback`, or logs it as one warning.
fn refusal_hook(callback: Option<Py<PyAny>>) -> RefusalHook {
    RefusalHook(Arc::new(move |peer: &str, why: &str| {
        Python::attach(|py| {
            let told = match &callback {
                Some(f) => f.call1(py, (peer, why)).map(drop),
                None => py
                    .import("logging")
                    .and_then(|m| m.call_method1("getLogger", ("mig.listener",)))
                    .and_then(|log| {
                        log.call_method1("warning", ("refused a connection from %s: %s", peer, why))
                    })
                    .map(drop),
            };
            if let Err(e) = told {
                e.write_unraisable(py, None); // a refusal must not stop the listener
            }
        })
    }))
}

fn seconds(name: &str, s: f64) -> PyResult<Duration> {
    if !s.is_finite() || s < 0.0 {
        return Err(PyValueError::new_err(format!(
            "{name} must be a non-negative number of seconds, got {s}"
        )));
    }
    Ok(Duration::from_secs_f64(s.min(1e9)))
}

/// A migration id: an int below 2**128, a UUID string, or 16 bytes.
fn migration_id(obj: &Bound<'_, PyAny>) -> PyResult<u128> {
    if let Ok(v) = obj.extract::<u128>() {
        return Ok(v);
    }
    if let Ok(s) = obj.extract::<String>() {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        if hex.len() == 32 {
            if let Ok(v) = u128::from_str_radix(&hex, 16) {
                return Ok(v);
            }
        }
    }
    if let Ok(b) = obj.extract::<Vec<u8>>() {
        if let Ok(arr) = <[u8; 16]>::try_from(b.as_slice()) {
            return Ok(u128::from_be_bytes(arr));
        }
    }
    Err(PyValueError::new_err(
        "migration_id must be an int in [0, 2**128), a UUID string or 16 bytes",
    ))
}

/// Mutual TLS from `tls_cert`, `tls_key` and `tls_ca` (PEM paths): all three
/// or none. Snapshot files have no peer to authenticate.
fn tls_config(
    uri: &str,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
) -> PyResult<Option<Arc<TlsConfig>>> {
    match (cert, key, ca) {
        (None, None, None) => Ok(None),
        (Some(cert), Some(key), Some(ca)) => {
            if uri.starts_with("file:") {
                return Err(PyValueError::new_err(
                    "TLS applies to tcp: and unix: channels; a file: snapshot has no peer",
                ));
            }
            Ok(Some(TlsConfig::load(&cert, &key, &ca)?))
        }
        _ => Err(PyValueError::new_err(
            "TLS needs all of tls_cert, tls_key and tls_ca (PEM files), or none",
        )),
    }
}

/// Waits (GIL released) for a control message of either side.
fn control_recv<'py>(
    py: Python<'py>,
    timeout: f64,
    recv: impl FnOnce(Duration) -> crate::CoreResult<Option<Vec<u8>>> + Send,
) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let t = seconds("timeout", timeout)?;
    let v = py.detach(move || recv(t))?;
    Ok(v.map(|b| PyBytes::new(py, &b)))
}

/// Streams guest memory to a destination over N channels.
#[pyclass(name = "Sender", module = "mig._mig", frozen)]
pub struct PySender {
    pub(super) inner: Arc<Sender>,
    uri: String,
    compression: Compression,
    migration_id: u128,
}

#[pymethods]
impl PySender {
    #[new]
    #[pyo3(signature = (memory, uri, *, migration_id, channels=2, packet_pages=128,
        compression="none", max_bandwidth=0, connect_timeout=10.0, io_timeout=60.0,
        tls_cert=None, tls_key=None, tls_ca=None, zero_copy_send=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        memory: &Bound<'_, PyGuestMemory>,
        uri: String,
        migration_id: &Bound<'_, PyAny>,
        channels: usize,
        packet_pages: u32,
        compression: &str,
        max_bandwidth: u64,
        connect_timeout: f64,
        io_timeout: f64,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        tls_ca: Option<PathBuf>,
        zero_copy_send: bool,
    ) -> PyResult<Self> {
        let tls = tls_config(&uri, tls_cert, tls_key, tls_ca)?;
        let cfg = SenderConfig {
            channels,
            migration_id: self::migration_id(migration_id)?,
            packet_pages,
            compression: Compression::parse(compression)?,
            max_bandwidth,
            connect_timeout: seconds("connect_timeout", connect_timeout)?,
            io_timeout: seconds("io_timeout", io_timeout)?,
            tls,
            zero_copy_send,
        };
        let mem = memory.get().inner.clone();
        let (c, id) = (cfg.compression, cfg.migration_id);
        let u = uri.clone();
        let inner = py.detach(move || Sender::connect(mem, &u, cfg))?;
        Ok(PySender {
            inner: Arc::new(inner),
            uri,
            compression: c,
            migration_id: id,
        })
    }

    #[getter]
    fn uri(&self) -> &str {
        &self.uri
    }

    #[getter]
    fn channels(&self) -> usize {
        self.inner.channels()
    }

    #[getter]
    fn migration_id(&self) -> u128 {
        self.migration_id
    }

    /// Sends the pages set in `bitmap` as part of `generation`; returns the
    /// bytes written to the channels.
    fn send_pages(
        &self,
        py: Python<'_>,
        bitmap: &Bound<'_, PyDirtyBitmap>,
        generation: u64,
    ) -> PyResult<u64> {
        let bm = bitmap.get().lock().clone();
        let s = self.inner.clone();
        Ok(py.detach(move || s.send_pages(&bm, generation))?)
    }

    /// Sends the pages at these indices (each at most once per generation)
    /// as part of `generation`; returns the bytes written to the channels.
    fn send_page_list(
        &self,
        py: Python<'_>,
        pages: PyReadonlyArray1<'_, u64>,
        generation: u64,
    ) -> PyResult<u64> {
        let pages = pages.as_slice()?.to_vec();
        let s = self.inner.clone();
        Ok(py.detach(move || s.send_page_list(&pages, generation))?)
    }

    #[pyo3(signature = (device_id, seq, data, r#final))]
    fn send_device_state(
        &self,
        py: Python<'_>,
        device_id: i64,
        seq: u64,
        data: &[u8],
        r#final: bool,
    ) -> PyResult<u64> {
        // The wire carries a u32; anything else is refused by name, not
        // with a bare integer-overflow error.
        let device_id = u32::try_from(device_id).map_err(|_| {
            PyValueError::new_err(format!(
                "device id must be in [0, {}], got {device_id}",
                u32::MAX
            ))
        })?;
        let s = self.inner.clone();
        Ok(py.detach(move || s.send_device_state(device_id, seq, data, r#final))?)
    }

    fn sync(&self, py: Python<'_>, generation: u64) -> PyResult<u64> {
        let s = self.inner.clone();
        Ok(py.detach(move || s.sync(generation))?)
    }

    fn finish(&self, py: Python<'_>, digest: u128) -> PyResult<u64> {
        let s = self.inner.clone();
        Ok(py.detach(move || s.finish(digest))?)
    }

    fn control_send(&self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        let s = self.inner.clone();
        Ok(py.detach(move || s.control_send(data))?)
    }

    fn control_recv<'py>(
        &self,
        py: Python<'py>,
        timeout: f64,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let s = self.inner.clone();
        control_recv(py, timeout, move |t| s.control_recv(t))
    }

    fn set_max_bandwidth(&self, bytes_per_s: u64) {
        self.inner.set_max_bandwidth(bytes_per_s);
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let st = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("transferred", st.transferred)?;
        d.set_item("payload-bytes", st.payload_bytes)?;
        d.set_item("normal", st.normal)?;
        d.set_item("normal-bytes", st.normal * st.page_size)?;
        d.set_item("zero-pages", st.zero_pages)?;
        d.set_item("page-size", st.page_size)?;
        d.set_item("channels", st.channel_packets.len())?;
        d.set_item("channel-packets", st.channel_packets)?;
        d.set_item("channel-bytes", st.channel_bytes)?;
        d.set_item("channel-busy-seconds", st.channel_busy)?;
        d.set_item("bandwidth", st.bandwidth)?;
        d.set_item("max-bandwidth", st.max_bandwidth)?;
        d.set_item("zero-copy-completions", st.zero_copy_done)?;
        d.set_item("zero-copy-copied", st.zero_copy_copied)?;
        d.set_item("compression", self.compression.name())?;
        d.set_item("failure", st.failure)?;
        Ok(d)
    }

    fn abort(&self, py: Python<'_>) {
        let s = self.inner.clone();
        py.detach(move || s.abort());
    }

    fn close(&self, py: Python<'_>) {
        let s = self.inner.clone();
        py.detach(move || s.close());
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _t: Option<&Bound<'_, PyAny>>,
        _v: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) {
        self.close(py);
    }

    fn __repr__(&self) -> String {
        format!(
            "Sender(uri={:?}, channels={}, migration_id={:032x})",
            self.uri,
            self.inner.channels(),
            self.migration_id
        )
    }
}

/// A bound endpoint that accepts one migration session per `accept`.
#[pyclass(name = "Listener", module = "mig._mig", frozen)]
pub struct PyListener {
    pub(super) inner: Mutex<Option<Arc<Listener>>>,
    uri: String,
    pub(super) tls: Option<Arc<TlsConfig>>,
}

#[pymethods]
impl PyListener {
    #[new]
    #[pyo3(signature = (uri, *, tls_cert=None, tls_key=None, tls_ca=None))]
    fn new(
        uri: &str,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        tls_ca: Option<PathBuf>,
    ) -> PyResult<Self> {
        let tls = tls_config(uri, tls_cert, tls_key, tls_ca)?;
        let (l, uri) = Listener::bind(uri)?;
        Ok(PyListener {
            inner: Mutex::new(Some(Arc::new(l))),
            uri,
            tls,
        })
    }

    /// Whether every channel must be mutual TLS.
    #[getter]
    fn tls(&self) -> bool {
        self.tls.is_some()
    }

    #[getter]
    fn uri(&self) -> &str {
        &self.uri
    }

    /// Waits up to `timeout` seconds for a control channel and its data
    /// channels, then starts applying them to `memory`. Each connection
    /// refused meanwhile goes to `on_refused(peer, reason)`, by default one
    /// warning on the `mig.listener` logger. `data_ranges`: the byte ranges
    /// of `memory` that may hold data, when taken before `populate` made
    /// every page present (the rest is known to be zeros and only this
    /// session writes the memory); by default the memory is asked now.
    #[pyo3(signature = (memory, timeout, *, io_timeout=60.0, device_buffer=32 << 20, on_refused=None, data_ranges=None))]
    #[allow(clippy::too_many_arguments)]
    fn accept(
        &self,
        py: Python<'_>,
        memory: &Bound<'_, PyGuestMemory>,
        timeout: f64,
        io_timeout: f64,
        device_buffer: usize,
        on_refused: Option<Py<PyAny>>,
        data_ranges: Option<Vec<(usize, usize)>>,
    ) -> PyResult<PyReceiver> {
        let listener = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| PyValueError::new_err("the listener is closed"))?;
        let cfg = ReceiverConfig {
            io_timeout: seconds("io_timeout", io_timeout)?,
            device_buffer,
            tls: self.tls.clone(),
            data_ranges,
        };
        let t = seconds("timeout", timeout)?;
        let mem = memory.get().inner.clone();
        if let Some(ranges) = &cfg.data_ranges {
            // Refused now, not once a source has connected.
            crate::receiver::check_data_ranges(&mem, ranges)?;
        }
        let hook = refusal_hook(on_refused);
        let r = py.detach(move || Receiver::accept(&listener, mem, t, cfg, Some(&hook)))?;
        Ok(PyReceiver { inner: Arc::new(r) })
    }

    fn close(&self) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        _t: Option<&Bound<'_, PyAny>>,
        _v: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) {
        self.close();
    }

    fn __repr__(&self) -> String {
        format!("Listener(uri={:?}, tls={})", self.uri, self.tls.is_some())
    }
}

/// The destination side of one session; channel threads apply pages as
/// they arrive.
#[pyclass(name = "Receiver", module = "mig._mig", frozen)]
pub struct PyReceiver {
    pub(super) inner: Arc<Receiver>,
}

#[pymethods]
impl PyReceiver {
    #[getter]
    fn migration_id(&self) -> u128 {
        self.inner.migration_id()
    }

    #[getter]
    fn channels(&self) -> usize {
        self.inner.channels()
    }

    /// The source's address as the control channel's peer; None for a file.
    #[getter]
    fn peer(&self) -> Option<String> {
        self.inner.peer().map(str::to_owned)
    }

    fn control_send(&self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        let r = self.inner.clone();
        Ok(py.detach(move || r.control_send(data))?)
    }

    fn control_recv<'py>(
        &self,
        py: Python<'py>,
        timeout: f64,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let r = self.inner.clone();
        control_recv(py, timeout, move |t| r.control_recv(t))
    }

    /// Drains the device-state records received so far, in arrival order.
    fn device_records<'py>(&self, py: Python<'py>) -> Vec<(u32, u64, Bound<'py, PyBytes>, bool)> {
        self.inner
            .device_records()
            .into_iter()
            .map(|(id, seq, data, last)| (id, seq, PyBytes::new(py, &data), last))
            .collect()
    }

    /// Waits for every channel's end record and takes the root of the
    /// destination memory (rehashing only the chunks still stale); with
    /// `verify`, fails unless it equals the source's digest from the end
    /// records.
    #[pyo3(signature = (timeout, verify=true))]
    fn wait_end<'py>(
        &self,
        py: Python<'py>,
        timeout: f64,
        verify: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let t = seconds("timeout", timeout)?;
        let r = self.inner.clone();
        let check = if verify {
            EndCheck::Now
        } else {
            EndCheck::Later
        };
        let end = py.detach(move || r.wait_end(t, check))?;
        let d = PyDict::new(py);
        d.set_item("digest", end.digest)?;
        d.set_item("source-digest", end.source_digest)?;
        d.set_item("channels", end.channels)?;
        d.set_item("syncs", end.generation_syncs)?;
        d.set_item("verify-time", end.verify_seconds)?;
        d.set_item("rehashed-chunks", end.rehashed_chunks)?;
        d.set_item("rehashed-bytes", end.rehashed_bytes)?;
        Ok(d)
    }

    /// The root of the destination memory now, as `GuestMemory.digest()`
    /// computes it (rehashing only the chunks written since their hash).
    fn memory_root(&self, py: Python<'_>) -> u128 {
        let r = self.inner.clone();
        py.detach(move || r.memory_root())
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let st = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("transferred", st.bytes)?;
        d.set_item("normal", st.normal)?;
        d.set_item("zero-pages", st.zero_pages)?;
        d.set_item("zero-filled", st.zero_filled)?;
        d.set_item("syncs", st.syncs)?;
        d.set_item("live-rewritten", st.live_rewritten)?;
        d.set_item("device-records", st.device_records)?;
        d.set_item("device-bytes", st.device_bytes)?;
        d.set_item("channel-packets", st.channel_packets)?;
        d.set_item("refused", st.refused)?;
        d.set_item("failure", st.failure)?;
        d.set_item("elapsed", st.elapsed)?;
        d.set_item("stale-chunks", st.stale_chunks)?;
        d.set_item("chunk-bytes", st.chunk_bytes)?;
        Ok(d)
    }

    fn abort(&self, py: Python<'_>) {
        let r = self.inner.clone();
        py.detach(move || r.abort());
    }

    fn __repr__(&self) -> String {
        format!(
            "Receiver(channels={}, migration_id={:032x})",
            self.inner.channels(),
            self.inner.migration_id()
        )
    }
}

/// Runs the sender's zero-page detection and compaction over the pages set
/// in `bitmap` (one thread, no I/O), in packets of `packet_pages`; with
/// `copy`, also copies the normal pages into a packet buffer as sending
/// does. For benchmarks.
#[pyfunction]
#[pyo3(signature = (memory, bitmap, packet_pages=128, copy=false))]
fn scan_pages<'py>(
    py: Python<'py>,
    memory: &Bound<'py, PyGuestMemory>,
    bitmap: &Bound<'py, PyDirtyBitmap>,
    packet_pages: usize,
    copy: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let mem = memory.get().inner.clone();
    let bm = bitmap.get().lock().clone();
    if packet_pages == 0 || packet_pages > crate::wire::MAX_PACKET_PAGES as usize {
        return Err(PyValueError::new_err("packet_pages out of range"));
    }
    let (normal, zero, bytes) =
        py.detach(move || -> crate::CoreResult<(usize, usize, usize)> {
            let pages = bm.indices();
            let mut payload = vec![
                0u8;
                if copy {
                    packet_pages * mem.page_size()
                } else {
                    0
                }
            ];
            let (mut n, mut z) = (Vec::new(), Vec::new());
            let (mut normal, mut zero, mut bytes) = (0, 0, 0);
            let mut check_holes = true;
            for chunk in pages.chunks(packet_pages) {
                n.clear();
                z.clear();
                sender::scan_pages(&mem, chunk, &mut n, &mut z, check_holes)?;
                check_holes = z.len() == chunk.len();
                if copy {
                    bytes += sender::copy_pages(&mem, &n, &mut payload)?;
                }
                normal += n.len();
                zero += z.len();
            }
            Ok((normal, zero, bytes))
        })?;
    let d = PyDict::new(py);
    d.set_item("normal", normal)?;
    d.set_item("zero-pages", zero)?;
    d.set_item("payload-bytes", bytes)?;
    Ok(d)
}

/// Reads all of `memory` once (one thread): the read-bandwidth baseline.
#[pyfunction]
fn read_memory(py: Python<'_>, memory: &Bound<'_, PyGuestMemory>) -> u64 {
    let mem = memory.get().inner.clone();
    py.detach(move || sender::read_all(&mem))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySender>()?;
    m.add_class::<PyListener>()?;
    m.add_class::<PyReceiver>()?;
    m.add_function(wrap_pyfunction!(scan_pages, m)?)?;
    m.add_function(wrap_pyfunction!(read_memory, m)?)?;
    Ok(())
}
