//! `mig._mig.WorkloadGuest`.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::memory::PyGuestMemory;
use crate::workload::WorkloadGuest;

#[pyclass(name = "WorkloadGuest", module = "mig._mig", frozen)]
pub struct PyWorkloadGuest {
    inner: Arc<WorkloadGuest>,
    memory: Py<PyGuestMemory>,
}

#[pymethods]
impl PyWorkloadGuest {
    #[new]
    #[pyo3(signature = (memory, vcpus = 1, workload = "idle"))]
    fn new(
        py: Python<'_>,
        memory: &Bound<'_, PyGuestMemory>,
        vcpus: usize,
        workload: &str,
    ) -> PyResult<Self> {
        let mem = memory.get().inner.clone();
        let spec = workload.to_string();
        let inner = py.detach(move || WorkloadGuest::new(mem, vcpus, &spec))?;
        Ok(PyWorkloadGuest {
            inner: Arc::new(inner),
            memory: memory.clone().unbind(),
        })
    }

    /// Stops every vCPU; returns the seconds until all were parked.
    fn pause(&self, py: Python<'_>) -> PyResult<f64> {
        let g = self.inner.clone();
        Ok(py.detach(move || g.pause())?.as_secs_f64())
    }

    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        let g = self.inner.clone();
        Ok(py.detach(move || g.resume())?)
    }

    /// Each 10 ms of running is followed by `pct / (1 - pct) × 10 ms` asleep;
    /// `pct` in [0.0, 0.99].
    fn set_throttle(&self, py: Python<'_>, pct: f64) -> PyResult<()> {
        let g = self.inner.clone();
        Ok(py.detach(move || g.set_throttle(pct))?)
    }

    /// Caps each vCPU at `rate` page writes/s; 0 removes the cap.
    fn set_dirty_limit(&self, py: Python<'_>, rate: f64) -> PyResult<()> {
        if !(rate.is_finite() && rate >= 0.0) {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "dirty limit {rate} must be a non-negative number of page writes/s"
            )));
        }
        let g = self.inner.clone();
        Ok(py.detach(move || g.set_dirty_limit(rate.round() as u64))?)
    }

    /// `writes`, `paused-time` (s), `rate` (achieved page writes/s since the
    /// last resume/throttle/limit change), `vcpu-writes`, `target-rate`,
    /// `throttle`, `dirty-limit`, `running`, `stop-latency` (s), `elapsed`
    /// (s), `vcpus`, `workload`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("writes", s.writes)?;
        d.set_item("paused-time", s.paused_time)?;
        d.set_item("rate", s.rate)?;
        d.set_item("vcpu-writes", s.vcpu_writes)?;
        d.set_item("target-rate", s.target_rate)?;
        d.set_item("throttle", s.throttle)?;
        d.set_item("dirty-limit", s.dirty_limit)?;
        d.set_item("running", s.running)?;
        d.set_item("stop-latency", s.stop_latency)?;
        d.set_item("elapsed", s.elapsed)?;
        d.set_item("vcpus", self.inner.vcpus())?;
        d.set_item("workload", self.inner.workload())?;
        Ok(d)
    }

    #[getter]
    fn running(&self) -> bool {
        self.inner.is_running()
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    #[getter]
    fn memory(&self, py: Python<'_>) -> Py<PyGuestMemory> {
        self.memory.clone_ref(py)
    }

    #[getter]
    fn vcpus(&self) -> usize {
        self.inner.vcpus()
    }

    /// The spec string the guest was created with.
    #[getter]
    fn workload(&self) -> &str {
        self.inner.workload()
    }

    /// Stops and joins the vCPU threads.
    fn close(&self, py: Python<'_>) {
        let g = self.inner.clone();
        py.detach(move || g.close())
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
            "WorkloadGuest(vcpus={}, workload={:?}, running={})",
            self.inner.vcpus(),
            self.inner.workload(),
            self.inner.is_running()
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyWorkloadGuest>()
}
