//! `mig._mig.DirtyBitmap`.

use std::sync::{Arc, Mutex, MutexGuard};

use numpy::ndarray::{ArrayView, Dimension, Ix1, Ix2};
use numpy::{Element, IntoPyArray, PyArray, PyArray1, PyArray2, PyReadonlyArray1};
use pyo3::prelude::*;

use crate::bitmap::{self, DirtyBitmap};

/// Owns the memory behind an array from `indices()` or `runs()` (its
/// `.base`): when numpy frees the array, the buffer goes back to the bitmap
/// decoder for reuse instead of to the kernel.
#[pyclass(name = "DecodedBuffer", module = "mig._mig", frozen)]
pub struct DecodedBuffer {
    data: Vec<u64>,
}

impl Drop for DecodedBuffer {
    fn drop(&mut self) {
        bitmap::recycle(std::mem::take(&mut self.data));
    }
}

/// A numpy array of `shape` over `data`, with no copy: the array keeps a
/// `DecodedBuffer` holding `data` alive.
fn decoded_array<'py, D: Dimension>(
    py: Python<'py>,
    data: Vec<u64>,
    shape: D,
) -> PyResult<Bound<'py, PyArray<u64, D>>>
where
    u64: Element,
{
    let ptr = data.as_ptr();
    let len = data.len();
    assert_eq!(shape.size(), len, "array shape must cover the buffer");
    let owner = Bound::new(py, DecodedBuffer { data })?;
    // SAFETY: `ptr` points at `len` initialised u64s owned by `owner`'s Vec,
    // which is never touched again until `owner` is dropped; numpy holds
    // `owner` as the array's base for as long as the array lives. The
    // shape's element count equals `len` (asserted above).
    unsafe {
        let view = ArrayView::from_shape_ptr(shape, ptr);
        Ok(PyArray::borrow_from_array(&view, owner.into_any()))
    }
}

#[pyclass(name = "DirtyBitmap", module = "mig._mig", frozen)]
pub struct PyDirtyBitmap {
    pub inner: Arc<Mutex<DirtyBitmap>>,
}

impl PyDirtyBitmap {
    pub fn wrap(bm: DirtyBitmap) -> Self {
        PyDirtyBitmap {
            inner: Arc::new(Mutex::new(bm)),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, DirtyBitmap> {
        // A panic while holding the lock cannot leave the words half-written
        // in a way that breaks invariants, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A consistent copy of `other`, taken before locking `self`, so that
    /// `a |= a` cannot deadlock.
    fn snapshot(other: &Bound<'_, PyDirtyBitmap>) -> DirtyBitmap {
        other.get().lock().clone()
    }
}

#[pymethods]
impl PyDirtyBitmap {
    #[new]
    fn new(num_pages: usize) -> Self {
        Self::wrap(DirtyBitmap::new(num_pages))
    }

    /// A bitmap with every page set.
    #[staticmethod]
    fn full(num_pages: usize) -> Self {
        Self::wrap(DirtyBitmap::full(num_pages))
    }

    /// From a numpy uint64 array of words (bit i of word w is page 64*w+i).
    #[staticmethod]
    fn from_numpy(words: PyReadonlyArray1<'_, u64>, num_pages: usize) -> PyResult<Self> {
        let v = words.as_slice()?.to_vec();
        Ok(Self::wrap(DirtyBitmap::from_words(v, num_pages)?))
    }

    /// From page indices (any integer sequence or numpy uint64 array).
    #[staticmethod]
    fn from_indices(indices: Vec<u64>, num_pages: usize) -> PyResult<Self> {
        Ok(Self::wrap(DirtyBitmap::from_indices(&indices, num_pages)?))
    }

    /// The words as a numpy uint64 array (a copy).
    fn to_numpy<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        let words = self.lock().words().to_vec();
        words.into_pyarray(py)
    }

    #[getter]
    fn num_pages(&self) -> usize {
        self.lock().len()
    }

    fn __len__(&self) -> usize {
        self.lock().len()
    }

    fn count(&self, py: Python<'_>) -> usize {
        let inner = self.inner.clone();
        py.detach(move || inner.lock().unwrap_or_else(|p| p.into_inner()).count())
    }

    /// The set pages as a numpy uint64 array, ascending.
    fn indices<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let inner = self.inner.clone();
        let v = py.detach(move || inner.lock().unwrap_or_else(|p| p.into_inner()).indices());
        let n = v.len();
        decoded_array(py, v, Ix1(n))
    }

    /// Maximal runs of set pages as an (n, 2) uint64 array of (start, length).
    fn runs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<u64>>> {
        let inner = self.inner.clone();
        let flat = py.detach(move || inner.lock().unwrap_or_else(|p| p.into_inner()).runs_flat());
        let n = flat.len() / 2;
        decoded_array(py, flat, Ix2(n, 2))
    }

    fn get(&self, page: usize) -> bool {
        self.lock().get(page)
    }

    fn set(&self, page: usize) -> PyResult<()> {
        Ok(self.lock().try_set(page)?)
    }

    fn set_range(&self, start: usize, length: usize) -> PyResult<()> {
        Ok(self.lock().set_range(start, length)?)
    }

    fn clear(&self) {
        self.lock().clear_all();
    }

    fn copy(&self) -> Self {
        Self::wrap(self.lock().clone())
    }

    /// Returns the set pages of `[start, start+length)` as a new bitmap and
    /// clears them here, atomically.
    fn test_and_clear(&self, start: usize, length: usize) -> PyResult<Self> {
        Ok(Self::wrap(self.lock().test_and_clear_range(start, length)?))
    }

    /// Moves every set page into a new bitmap, leaving this one empty.
    fn take(&self) -> Self {
        Self::wrap(self.lock().take())
    }

    fn __ior__(&self, other: &Bound<'_, PyDirtyBitmap>) -> PyResult<()> {
        let o = Self::snapshot(other);
        Ok(self.lock().or_assign(&o)?)
    }

    fn __or__(&self, other: &Bound<'_, PyDirtyBitmap>) -> PyResult<Self> {
        let o = Self::snapshot(other);
        let mut out = self.lock().clone();
        out.or_assign(&o)?;
        Ok(Self::wrap(out))
    }

    /// Drops from this bitmap every page set in `other`.
    fn and_not(&self, other: &Bound<'_, PyDirtyBitmap>) -> PyResult<()> {
        let o = Self::snapshot(other);
        Ok(self.lock().and_not_assign(&o)?)
    }

    fn __eq__(&self, other: &Bound<'_, PyDirtyBitmap>) -> bool {
        let o = Self::snapshot(other);
        *self.lock() == o
    }

    fn __repr__(&self) -> String {
        let bm = self.lock();
        format!("DirtyBitmap(num_pages={}, count={})", bm.len(), bm.count())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDirtyBitmap>()?;
    m.add_class::<DecodedBuffer>()
}
