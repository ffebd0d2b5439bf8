/* What weightstream.native._spans and weightstream.native._layout share: reading an exact
 * NumPy array's shape, dtype and data from its own fields, and the type test they both use for
 * torch tensors. Each extension includes it once, so each keeps its own copy of the statics
 * below (one layout check of NumPy's array head per module and process).
 */
#ifndef WEIGHTSTREAM_NATIVE_SHARED_H
#define WEIGHTSTREAM_NATIVE_SHARED_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define AHEAD 16 /* items prefetched ahead of a pass over many small tensors */

static PyObject *str_dtype, *str_shape; /* interned once: a lookup by C string makes a new str each time */

/* Intern the names both modules look up; call from the module's init. */
static int intern_shared(void) {
    str_dtype = PyUnicode_InternFromString("dtype");
    str_shape = PyUnicode_InternFromString("shape");
    return str_dtype != NULL && str_shape != NULL ? 0 : -1;
}

static int is_one_of(PyObject *item, PyObject *types) {
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(types); k++)
        if (Py_TYPE(item) == (PyTypeObject *)PyTuple_GET_ITEM(types, k)) return 1;
    return 0;
}

/* The leading fields of NumPy's PyArrayObject_fields: public ABI since NumPy 1.7 (every compiled
 * extension's PyArray_NDIM, PyArray_DIMS and PyArray_DESCR read them), in NumPy 2 as in 1.
 * Reading them skips ``.shape``, which builds a tuple per array: 70% of a 100k-tensor check. */
typedef struct {
    PyObject_HEAD
    char *data;
    int nd;
    Py_ssize_t *dimensions;
    Py_ssize_t *strides;
    PyObject *base;
    PyObject *descr;
    int flags;
} NumpyArrayHead;

#define NPY_C_CONTIGUOUS_FLAG 0x0001 /* NPY_ARRAY_C_CONTIGUOUS */

/* 1 when this NumPy's arrays have the fields above where they are expected: checked against
 * ``.shape``, ``.dtype``, the data address and the C-contiguous flag once per process, on
 * the first array met; -1 before that. */
static int numpy_head_ok = -1;

static int check_numpy_head(PyObject *array) {
    NumpyArrayHead *head = (NumpyArrayHead *)array;
    PyObject *shape = PyObject_GetAttr(array, str_shape), *dtype = PyObject_GetAttr(array, str_dtype);
    PyObject *iface = PyObject_GetAttrString(array, "__array_interface__");
    PyObject *data = iface != NULL && PyDict_Check(iface) ? PyDict_GetItemString(iface, "data") : NULL; /* borrowed */
    PyObject *flags = PyObject_GetAttrString(array, "flags");
    PyObject *contiguous = flags != NULL ? PyObject_GetAttrString(flags, "c_contiguous") : NULL;
    int ok = shape != NULL && dtype != NULL && PyTuple_CheckExact(shape) && head->descr == dtype &&
             head->nd >= 0 && PyTuple_GET_SIZE(shape) == head->nd && data != NULL && PyTuple_Check(data) &&
             PyTuple_GET_SIZE(data) >= 1 && PyLong_AsVoidPtr(PyTuple_GET_ITEM(data, 0)) == (void *)head->data &&
             contiguous != NULL && (contiguous == Py_True) == ((head->flags & NPY_C_CONTIGUOUS_FLAG) != 0);
    for (Py_ssize_t k = 0; ok && k < head->nd; k++)
        ok = PyLong_AsSsize_t(PyTuple_GET_ITEM(shape, k)) == head->dimensions[k];
    Py_XDECREF(shape);
    Py_XDECREF(dtype);
    Py_XDECREF(iface);
    Py_XDECREF(flags);
    Py_XDECREF(contiguous);
    if (PyErr_Occurred()) return -1;
    return ok;
}

/* Ask for an exact ndarray's dims block, which NumPy allocates apart from the array (its head
 * must have been fetched already: this reads its type and dims pointer). */
static inline void prefetch_dims(PyObject *item, PyTypeObject *ndarray) {
#if defined(__GNUC__)
    if (numpy_head_ok == 1 && ndarray != NULL && Py_TYPE(item) == ndarray)
        __builtin_prefetch(((NumpyArrayHead *)item)->dimensions);
#else
    (void)item, (void)ndarray;
#endif
}
#endif /* WEIGHTSTREAM_NATIVE_SHARED_H */
