/* weightstream.native._layout: whether a push or a state dict is exactly the last one, in C.
 *
 * A trainer pushes the same layout every step and a rank loads into the same state dict every
 * version: these answer "unchanged?" in one pass, so the Python code can reuse what it built
 * last time. Like _spans, an accelerator only: the Python code owns every check and error
 * message, and does everything where this module was not built.
 *
 *   unchanged_arrays(items, ndarray, code_of, names, codes, shapes[, tensor_types]) -> tuple | None
 *
 * The tensors of ``items`` (``(name, tensor)`` pairs: exact NumPy arrays, whose dtype and
 * shape are read from the array's own fields, or tensors whose type is exactly one of
 * ``tensor_types``, shaped by ``size()``, which torch answers ~5x faster than ``.shape``) if
 * every pair has exactly the previous push's name, dtype code and shape, else None. A
 * dtype's code is looked up only when the dtype object differs from the last tensor's
 * (NumPy hashes a dtype anew each time, ~10% of the pass). One pass, and no object that
 * outlives it:
 * an RL loop pushes the same layout every step, and building 100k shape tuples per push
 * costs more than comparing them, then again in the garbage collector.
 *
 *   same_items(mapping, keys, values) -> bool
 *
 * Does the dict hold exactly ``keys`` (equal str) bound to ``values`` (the same objects), in
 * that order? A receiver's NumPy state dict, checked every version before its cached specs
 * are trusted, without building two 100k lists to compare.
 *
 *   dict_version(mapping) -> int | None
 *
 * The dict's version tag (PEP 509): it changes whenever an entry is added, removed or bound to
 * another object, and no two states of any dicts share one. Equal to the tag seen when
 * ``same_items`` last passed, the dict still holds the same items, with no walk at all (a
 * 100k-entry walk is 0.5-1.5 ms on a rank's path to READY). None from Python 3.12 on, which
 * deprecated the tag (3.13 dropped it): callers walk.
 *
 *   kept_views(rows, kept) -> Iterator | None
 *
 * The items rows[0], rows[1], ... of an exact ndarray ``rows`` (a batch of tensors of one dtype
 * and shape at equal steps in a slot), each the view ``kept[i]`` holds from an earlier bucket
 * at that place when it is exactly what rows[i] would be (an exact ndarray at the same address
 * with the same dtype object, shape, strides and flags) and nothing but the list holds it,
 * not even weakly;
 * otherwise rows[i] made anew, which then takes that place in ``kept``. Making a view is ~0.1
 * us, 8-10% of an engine's loop over 100k small tensors, and a view that load_weights let go
 * is indistinguishable from a new one. None where NumPy's array head is not as expected
 * (callers iterate ``rows``).
 */
#include "_shared.h"

static PyObject *str_size;

/* 1 if the array's shape is the tuple of ints ``want``, 0 if not. */
static int numpy_shape_is(PyObject *array, PyObject *want) {
    NumpyArrayHead *head = (NumpyArrayHead *)array;
    if (!PyTuple_CheckExact(want) || PyTuple_GET_SIZE(want) != head->nd) return 0;
    for (Py_ssize_t k = 0; k < head->nd; k++) {
        PyObject *dim = PyTuple_GET_ITEM(want, k);
        if (!PyLong_CheckExact(dim)) return 0;
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(dim, &overflow);
        if (overflow || v != (long long)head->dimensions[k]) return 0;
    }
    return 1;
}

/* Each pair's tuple, array, dims block and previous shape lie apart in memory: fetched one after
 * another they are ~5 cache misses a tensor. Ask for them a few pairs ahead, each stage reading
 * only what an earlier stage fetched (a hint: wrong or late costs nothing but the fetch). */
static void prefetch_pairs(PyObject *pairs, PyObject *shapes, PyObject *ndarray, Py_ssize_t i, Py_ssize_t n) {
#if defined(__GNUC__)
    if (i + 2 * AHEAD < n) __builtin_prefetch(PyTuple_GET_ITEM(pairs, i + 2 * AHEAD));
    if (i + AHEAD < n) {
        PyObject *pair = PyTuple_GET_ITEM(pairs, i + AHEAD);
        if (PyTuple_CheckExact(pair) && PyTuple_GET_SIZE(pair) == 2) __builtin_prefetch(PyTuple_GET_ITEM(pair, 1));
        __builtin_prefetch(PyList_GET_ITEM(shapes, i + AHEAD));
    }
    if (i + AHEAD / 2 < n) {
        PyObject *pair = PyTuple_GET_ITEM(pairs, i + AHEAD / 2), *shape = PyList_GET_ITEM(shapes, i + AHEAD / 2);
        if (PyTuple_CheckExact(pair) && PyTuple_GET_SIZE(pair) == 2)
            prefetch_dims(PyTuple_GET_ITEM(pair, 1), (PyTypeObject *)ndarray);
        if (PyTuple_CheckExact(shape) && PyTuple_GET_SIZE(shape) > 0) __builtin_prefetch(PyTuple_GET_ITEM(shape, 0));
    }
#else
    (void)pairs, (void)shapes, (void)ndarray, (void)i, (void)n;
#endif
}

static PyObject *unchanged_arrays(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *items, *ndarray, *code_of, *names, *codes, *shapes, *tensor_types = NULL;
    if (!PyArg_ParseTuple(args, "O!OO!O!O!O!|O!", &PyList_Type, &items, &ndarray, &PyDict_Type, &code_of, &PyList_Type,
                          &names, &PyList_Type, &codes, &PyList_Type, &shapes, &PyTuple_Type, &tensor_types))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(items);
    if (PyList_GET_SIZE(names) != n || PyList_GET_SIZE(codes) != n || PyList_GET_SIZE(shapes) != n) Py_RETURN_NONE;
    /* a snapshot: a torch accessor may run Python code (a TorchFunctionMode) that changes the list */
    PyObject *pairs = PyList_AsTuple(items);
    if (pairs == NULL) return NULL;
    PyObject *tensors = PyTuple_New(n); /* a tuple: the ring gather takes it as it is */
    if (tensors == NULL) {
        Py_DECREF(pairs);
        return NULL;
    }
    PyObject *last_dtype = NULL, *last_code = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyList_GET_SIZE(names) != n || PyList_GET_SIZE(codes) != n || PyList_GET_SIZE(shapes) != n) goto changed;
        prefetch_pairs(pairs, shapes, ndarray, i, n);
        PyObject *item = PyTuple_GET_ITEM(pairs, i);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2) goto changed;
        PyObject *name = PyTuple_GET_ITEM(item, 0), *tensor = PyTuple_GET_ITEM(item, 1);
        int numpy = Py_TYPE(tensor) == (PyTypeObject *)ndarray;
        if (!numpy && !(tensor_types != NULL && is_one_of(tensor, tensor_types))) goto changed;
        int same = name == PyList_GET_ITEM(names, i);
        if (!same) {
            if (!PyUnicode_CheckExact(name)) goto changed;
            if ((same = PyObject_RichCompareBool(name, PyList_GET_ITEM(names, i), Py_EQ)) < 0) goto failed;
            if (!same) goto changed;
        }
        if (numpy && numpy_head_ok < 0 && (numpy_head_ok = check_numpy_head(tensor)) < 0) goto failed;
        int head = numpy && numpy_head_ok;
        PyObject *dtype = head ? Py_NewRef(((NumpyArrayHead *)tensor)->descr) : PyObject_GetAttr(tensor, str_dtype);
        if (dtype == NULL) goto failed;
        if (dtype == last_dtype) { /* a model has few dtypes, each one object: no hash per tensor */
            Py_DECREF(dtype);
        } else {
            PyObject *code = PyDict_GetItemWithError(code_of, dtype); /* borrowed */
            Py_XSETREF(last_dtype, dtype); /* held: a freed dtype's address could come back as another */
            if (code == NULL) {
                if (PyErr_Occurred()) goto failed;
                goto changed; /* not a wire dtype: the general path says so */
            }
            Py_INCREF(code);
            Py_XSETREF(last_code, code);
        }
        if ((same = PyObject_RichCompareBool(last_code, PyList_GET_ITEM(codes, i), Py_EQ)) < 0) goto failed;
        if (!same) goto changed;
        if (head) {
            if (!numpy_shape_is(tensor, PyList_GET_ITEM(shapes, i))) goto changed;
        } else {
            PyObject *shape = numpy ? PyObject_GetAttr(tensor, str_shape) : PyObject_CallMethodNoArgs(tensor, str_size);
            if (shape == NULL) goto failed;
            same = PyObject_RichCompareBool(shape, PyList_GET_ITEM(shapes, i), Py_EQ);
            Py_DECREF(shape);
            if (same < 0) goto failed;
            if (!same) goto changed;
        }
        Py_INCREF(tensor);
        PyTuple_SET_ITEM(tensors, i, tensor);
    }
    PyObject *result = tensors;
    goto done;
changed:
    Py_DECREF(tensors);
    result = Py_NewRef(Py_None);
    goto done;
failed:
    Py_DECREF(tensors);
    result = NULL;
done:
    Py_DECREF(pairs);
    Py_XDECREF(last_dtype);
    Py_XDECREF(last_code);
    return result;
}

static PyObject *same_items(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *mapping, *keys, *values;
    if (!PyArg_ParseTuple(args, "O!O!O!", &PyDict_Type, &mapping, &PyList_Type, &keys, &PyList_Type, &values))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(keys);
    if (PyDict_GET_SIZE(mapping) != n || PyList_GET_SIZE(values) != n) Py_RETURN_FALSE;
    Py_ssize_t pos = 0, i = 0;
    PyObject *key, *value;
    while (PyDict_Next(mapping, &pos, &key, &value)) {
        if (i >= n || value != PyList_GET_ITEM(values, i)) Py_RETURN_FALSE;
        PyObject *want = PyList_GET_ITEM(keys, i);
        /* exact str only: comparing them runs no Python code, so the dict cannot change under us */
        if (key != want && !(PyUnicode_CheckExact(key) && PyUnicode_CheckExact(want) && PyUnicode_Compare(key, want) == 0))
            Py_RETURN_FALSE;
        i++;
    }
    if (PyErr_Occurred()) return NULL;
    return PyBool_FromLong(i == n);
}

static PyObject *dict_version(PyObject *Py_UNUSED(self), PyObject *mapping) {
    if (!PyDict_Check(mapping)) {
        PyErr_Format(PyExc_TypeError, "dict_version: expected a dict, got %s", Py_TYPE(mapping)->tp_name);
        return NULL;
    }
#if PY_VERSION_HEX < 0x030C0000
    return PyLong_FromUnsignedLongLong(((PyDictObject *)mapping)->ma_version_tag);
#else
    Py_RETURN_NONE;
#endif
}

/* --- kept_views ------------------------------------------------------------------------ */

#define MAX_ITEM_DIMS 64 /* NPY_MAXDIMS in NumPy 2 (32 in 1.x) */

typedef struct {
    PyObject_HEAD
    PyObject *rows, *kept; /* the batch, and the views kept per item */
    Py_ssize_t next, count, step;
    char *data;           /* rows' data: item i is at data + i * step */
    PyObject *descr;      /* rows' dtype object, which NumPy gives each item */
    int nd, flags;        /* an item's ndim, and a new item's flags */
    Py_ssize_t dims[MAX_ITEM_DIMS], strides[MAX_ITEM_DIMS]; /* an item's: copied, rows may change */
} KeptViews;

static PyTypeObject KeptViewsType;

/* Does anything refer to ``obj`` weakly? A weakref, a WeakValueDictionary entry or a
 * weakref.finalize on a view the engine let go must see it die, not come back as another
 * tensor's view. Where the type keeps its weak references elsewhere than at a fixed offset,
 * say yes: the view is then never handed out again. */
static int weakly_held(PyObject *obj) {
    Py_ssize_t offset = Py_TYPE(obj)->tp_weaklistoffset;
    if (offset <= 0) return offset < 0;
    return *(PyObject **)((char *)obj + offset) != NULL;
}

/* Is ``view`` exactly what rows[i] would be, and held by the kept list alone? */
static int kept_view_fits(KeptViews *self, PyObject *view, Py_ssize_t i) {
    if (Py_TYPE(view) != Py_TYPE(self->rows) || Py_REFCNT(view) != 1 || weakly_held(view)) return 0;
    NumpyArrayHead *head = (NumpyArrayHead *)view;
    if (head->data != self->data + i * self->step || head->nd != self->nd || head->descr != self->descr ||
        head->flags != self->flags)
        return 0;
    for (int k = 0; k < self->nd; k++)
        if (head->dimensions[k] != self->dims[k] || head->strides[k] != self->strides[k]) return 0;
    return 1;
}

static PyObject *kept_views(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *rows, *kept;
    if (!PyArg_ParseTuple(args, "OO!", &rows, &PyList_Type, &kept)) return NULL;
#ifdef Py_GIL_DISABLED
    Py_RETURN_NONE; /* "held by the list alone" is not a plain refcount read there */
#endif
    if (numpy_head_ok < 0 && (numpy_head_ok = check_numpy_head(rows)) < 0) return NULL;
    NumpyArrayHead *head = (NumpyArrayHead *)rows;
    if (!numpy_head_ok || head->nd < 1 || head->nd - 1 > MAX_ITEM_DIMS || PyList_GET_SIZE(kept) != head->dimensions[0])
        Py_RETURN_NONE;
    KeptViews *it = PyObject_New(KeptViews, &KeptViewsType);
    if (it == NULL) return NULL;
    it->rows = Py_NewRef(rows);
    it->kept = Py_NewRef(kept);
    it->next = 0;
    it->count = head->dimensions[0];
    it->step = head->strides[0];
    it->data = head->data;
    it->descr = Py_NewRef(head->descr);
    it->nd = head->nd - 1;
    it->flags = -1;
    for (int k = 0; k < it->nd; k++) {
        it->dims[k] = head->dimensions[k + 1];
        it->strides[k] = head->strides[k + 1];
    }
    if (it->count) { /* a new item says what flags the items get (rows' own may differ) */
        PyObject *probe = PySequence_GetItem(rows, 0);
        if (probe == NULL || Py_TYPE(probe) != Py_TYPE(rows)) {
            Py_XDECREF(probe);
            Py_DECREF(it);
            if (PyErr_Occurred()) return NULL;
            Py_RETURN_NONE;
        }
        it->flags = ((NumpyArrayHead *)probe)->flags;
        PyObject *old = PyList_GET_ITEM(kept, 0);
        if (old == Py_None || !kept_view_fits(it, old, 0)) {
            PyList_SET_ITEM(kept, 0, probe); /* the list's reference; the old one dropped below */
            Py_DECREF(old);
        } else {
            Py_DECREF(probe);
        }
    }
    return (PyObject *)it;
}

static PyObject *kept_views_next(KeptViews *self) {
    if (self->next >= self->count) return NULL;
    if (PyList_GET_SIZE(self->kept) != self->count) {
        PyErr_SetString(PyExc_RuntimeError, "kept_views: the kept list changed size during iteration");
        return NULL;
    }
    Py_ssize_t i = self->next++;
#if defined(__GNUC__)
    if (i + AHEAD < self->count) __builtin_prefetch(PyList_GET_ITEM(self->kept, i + AHEAD));
#endif
    PyObject *view = PyList_GET_ITEM(self->kept, i);
    if (view != Py_None && kept_view_fits(self, view, i)) return Py_NewRef(view);
    PyObject *fresh = PySequence_GetItem(self->rows, i);
    if (fresh == NULL) return NULL;
    if (PyList_GET_SIZE(self->kept) == self->count) { /* a finalizer may have run: look again */
        PyObject *old = PyList_GET_ITEM(self->kept, i);
        PyList_SET_ITEM(self->kept, i, Py_NewRef(fresh));
        Py_DECREF(old); /* may run a weakref callback: nothing is read after it */
    }
    return fresh;
}

static PyObject *kept_views_length_hint(KeptViews *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromSsize_t(self->count - self->next);
}

static void kept_views_dealloc(KeptViews *self) {
    Py_DECREF(self->rows);
    Py_DECREF(self->kept);
    Py_DECREF(self->descr);
    PyObject_Free(self);
}

static PyMethodDef kept_views_methods[] = {
    {"__length_hint__", (PyCFunction)kept_views_length_hint, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject KeptViewsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "weightstream.native._layout.KeptViews",
    .tp_basicsize = sizeof(KeptViews),
    .tp_dealloc = (destructor)kept_views_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)kept_views_next,
    .tp_methods = kept_views_methods,
};

static PyMethodDef methods[] = {
    {"unchanged_arrays", unchanged_arrays, METH_VARARGS,
     "unchanged_arrays(items, ndarray, code_of, names, codes, shapes[, tensor_types]) -> tuple | None\n\n"
     "The tensors of the (name, tensor) pairs in the list items, if every pair is an exact ndarray (or of a\n"
     "type in tensor_types) with names[i], the dtype whose code_of[dtype] is codes[i] and shapes[i]; else None."},
    {"same_items", same_items, METH_VARARGS,
     "same_items(mapping, keys, values) -> bool\n\n"
     "Whether the dict holds exactly keys (equal str) bound to the very objects in values, in that order."},
    {"dict_version", dict_version, METH_O,
     "dict_version(mapping) -> int | None\n\n"
     "The dict's PEP 509 version tag, which changes with every added, removed or rebound entry; None where\n"
     "this Python has none (3.12 on)."},
    {"kept_views", kept_views, METH_VARARGS,
     "kept_views(rows, kept) -> Iterator | None\n\n"
     "The items of the ndarray rows, each the view kept[i] holds when it is exactly rows[i] and held by the\n"
     "list alone, else rows[i] made anew and kept there; None where NumPy's array head is not as expected."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_layout", .m_doc = NULL, .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__layout(void) {
    str_size = PyUnicode_InternFromString("size");
    if (intern_shared() < 0 || !str_size || PyType_Ready(&KeptViewsType) < 0) return NULL;
    return PyModule_Create(&module);
}
