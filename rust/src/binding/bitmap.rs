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

type Shared = Arc<Mutex<DirtyBitmap>>;

fn lock(m: &Mutex<DirtyBitmap>) -> MutexGuard<'_, DirtyBitmap> {
    // A panic while holding the lock cannot leave the words half-written
    // in a way that breaks invariants, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f(a, b)` with both bitmaps locked. Two distinct bitmaps are locked
/// in address order, so `a |= b` and `b |= a` in two threads cannot
/// deadlock; `a |= a` works on a copy of `a`.
fn with_pair<R>(a: &Shared, b: &Shared, f: impl FnOnce(&mut DirtyBitmap, &DirtyBitmap) -> R) -> R {
    if Arc::ptr_eq(a, b) {
        let mut g = lock(a);
        let copy = g.clone();
        return f(&mut g, &copy);
    }
    if Arc::as_ptr(a) < Arc::as_ptr(b) {
        let mut ga = lock(a);
        let gb = lock(b);
        f(&mut ga, &gb)
    } else {
        let gb = lock(b);
        let mut ga = lock(a);
        f(&mut ga, &gb)
    }
}

/// A numpy array's words, readable from a thread without the GIL.
struct RawWords {
    ptr: *const u64,
    len: usize,
}

// SAFETY: only read inside `detach` while the caller keeps the array (and its
// readonly borrow) alive on its stack.
unsafe impl Send for RawWords {}

impl RawWords {
    fn of(array: &PyReadonlyArray1<'_, u64>) -> PyResult<Self> {
        let s = array.as_slice()?;
        Ok(RawWords {
            ptr: s.as_ptr(),
            len: s.len(),
        })
    }

    /// # Safety
    /// The array `of` was called on is alive and not resized for `'a`.
    unsafe fn slice<'a>(&self) -> &'a [u64] {
        // SAFETY: per the contract above; a Python thread writing the array
        // meanwhile only changes which values are read (as with any buffer
        // handed to native code without the GIL).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl PyDirtyBitmap {
    pub fn wrap(bm: DirtyBitmap) -> Self {
        PyDirtyBitmap {
            inner: Arc::new(Mutex::new(bm)),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, DirtyBitmap> {
        lock(&self.inner)
    }

    /// Runs `f` on the locked bitmap with the GIL released (every O(n)
    /// method goes through here, so other Python threads keep running).
    fn detached<R: Send>(&self, py: Python<'_>, f: impl FnOnce(&mut DirtyBitmap) -> R + Send) -> R {
        let inner = self.inner.clone();
        py.detach(move || f(&mut lock(&inner)))
    }

    /// Like `detached`, with `other` locked too (see `with_pair`).
    fn detached_pair<R: Send>(
        &self,
        py: Python<'_>,
        other: &Bound<'_, PyDirtyBitmap>,
        f: impl FnOnce(&mut DirtyBitmap, &DirtyBitmap) -> R + Send,
    ) -> R {
        let (a, b) = (self.inner.clone(), other.get().inner.clone());
        py.detach(move || with_pair(&a, &b, f))
    }
}

#[pymethods]
impl PyDirtyBitmap {
    #[new]
    fn new(py: Python<'_>, num_pages: usize) -> Self {
        Self::wrap(py.detach(|| DirtyBitmap::new(num_pages)))
    }

    /// A bitmap with every page set.
    #[staticmethod]
    fn full(py: Python<'_>, num_pages: usize) -> Self {
        Self::wrap(py.detach(|| DirtyBitmap::full(num_pages)))
    }

    /// From a numpy uint64 array of words (bit i of word w is page 64*w+i).
    #[staticmethod]
    fn from_numpy(
        py: Python<'_>,
        words: PyReadonlyArray1<'_, u64>,
        num_pages: usize,
    ) -> PyResult<Self> {
        let raw = RawWords::of(&words)?;
        // SAFETY: `words` outlives the detached call.
        let bm =
            py.detach(move || DirtyBitmap::from_words(unsafe { raw.slice() }.to_vec(), num_pages))?;
        Ok(Self::wrap(bm))
    }

    /// From page indices (any integer sequence or numpy uint64 array).
    #[staticmethod]
    fn from_indices(
        py: Python<'_>,
        indices: &Bound<'_, PyAny>,
        num_pages: usize,
    ) -> PyResult<Self> {
        let bm = if let Ok(array) = indices.extract::<PyReadonlyArray1<'_, u64>>() {
            let raw = RawWords::of(&array)?;
            // SAFETY: `array` outlives the detached call.
            py.detach(move || DirtyBitmap::from_indices(unsafe { raw.slice() }, num_pages))?
        } else {
            // A Python sequence: converting its ints needs the GIL.
            let v: Vec<u64> = indices.extract()?;
            py.detach(move || DirtyBitmap::from_indices(&v, num_pages))?
        };
        Ok(Self::wrap(bm))
    }

    /// The words as a numpy uint64 array (a copy).
    fn to_numpy<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        let words = self.detached(py, |bm| bm.words().to_vec());
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
        self.detached(py, |bm| bm.count())
    }

    /// The set pages as a numpy uint64 array, ascending.
    fn indices<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let v = self.detached(py, |bm| bm.indices());
        let n = v.len();
        decoded_array(py, v, Ix1(n))
    }

    /// Maximal runs of set pages as an (n, 2) uint64 array of (start, length).
    fn runs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<u64>>> {
        let flat = self.detached(py, |bm| bm.runs_flat());
        let n = flat.len() / 2;
        decoded_array(py, flat, Ix2(n, 2))
    }

    fn get(&self, page: usize) -> bool {
        self.lock().get(page)
    }

    fn set(&self, page: usize) -> PyResult<()> {
        Ok(self.lock().try_set(page)?)
    }

    fn set_range(&self, py: Python<'_>, start: usize, length: usize) -> PyResult<()> {
        Ok(self.detached(py, |bm| bm.set_range(start, length))?)
    }

    fn clear(&self, py: Python<'_>) {
        self.detached(py, |bm| bm.clear_all());
    }

    fn copy(&self, py: Python<'_>) -> Self {
        Self::wrap(self.detached(py, |bm| bm.clone()))
    }

    /// Returns the set pages of `[start, start+length)` as a new bitmap and
    /// clears them here, atomically.
    fn test_and_clear(&self, py: Python<'_>, start: usize, length: usize) -> PyResult<Self> {
        let taken = self.detached(py, |bm| bm.test_and_clear_range(start, length))?;
        Ok(Self::wrap(taken))
    }

    /// Moves every set page into a new bitmap, leaving this one empty.
    fn take(&self, py: Python<'_>) -> Self {
        Self::wrap(self.detached(py, |bm| bm.take()))
    }

    fn __ior__(&self, py: Python<'_>, other: &Bound<'_, PyDirtyBitmap>) -> PyResult<()> {
        Ok(self.detached_pair(py, other, |a, b| a.or_assign(b))?)
    }

    fn __or__(&self, py: Python<'_>, other: &Bound<'_, PyDirtyBitmap>) -> PyResult<Self> {
        let out = self.detached_pair(py, other, |a, b| {
            let mut out = a.clone();
            out.or_assign(b).map(|()| out)
        })?;
        Ok(Self::wrap(out))
    }

    /// Drops from this bitmap every page set in `other`.
    fn and_not(&self, py: Python<'_>, other: &Bound<'_, PyDirtyBitmap>) -> PyResult<()> {
        Ok(self.detached_pair(py, other, |a, b| a.and_not_assign(b))?)
    }

    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyDirtyBitmap>) -> bool {
        self.detached_pair(py, other, |a, b| *a == *b)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        self.detached(py, |bm| {
            format!("DirtyBitmap(num_pages={}, count={})", bm.len(), bm.count())
        })
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDirtyBitmap>()?;
    m.add_class::<DecodedBuffer>()
}
