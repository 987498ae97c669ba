//! The Python binding: the only module that knows pyo3.
//!
//! Each submodule wraps one core concept; this file maps core errors to
//! Python exceptions and registers the classes in `mig._mig`.

use pyo3::prelude::*;

use crate::error::CoreError;

mod bitmap;
mod chunk_digest;
mod memory;
mod postcopy;
mod postcopy_link;
mod ram_stream;
mod stream;
mod tracker;
mod workload;

pyo3::create_exception!(mig, MigError, pyo3::exceptions::PyException);
pyo3::create_exception!(mig, UnsupportedError, MigError);
pyo3::create_exception!(mig, ProtocolError, MigError);

impl From<CoreError> for PyErr {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::Invalid(msg) => pyo3::exceptions::PyValueError::new_err(msg),
            CoreError::Unsupported(msg) => UnsupportedError::new_err(msg),
            CoreError::Protocol { .. } => ProtocolError::new_err(e.to_string()),
            CoreError::Io { .. } => {
                let msg = e.to_string();
                match e {
                    CoreError::Io { source, .. } => pyo3::exceptions::PyOSError::new_err((
                        source.raw_os_error().unwrap_or(0),
                        msg,
                    )),
                    _ => unreachable!("matched Io above"),
                }
            }
        }
    }
}

#[pymodule]
#[pyo3(name = "_mig")]
fn mig_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("MigError", m.py().get_type::<MigError>())?;
    m.add("UnsupportedError", m.py().get_type::<UnsupportedError>())?;
    m.add("ProtocolError", m.py().get_type::<ProtocolError>())?;
    m.add("page_size", crate::memory::host_page_size())?;
    memory::register(m)?;
    chunk_digest::register(m)?;
    bitmap::register(m)?;
    tracker::register(m)?;
    postcopy::register(m)?;
    postcopy_link::register(m)?;
    workload::register(m)?;
    stream::register(m)?;
    ram_stream::register(m)?;
    Ok(())
}
