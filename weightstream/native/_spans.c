/* weightstream.native._spans: the per-tensor copy loops of a push, in C.
 *
 * At 100k tensors of 4 KiB an interpreted loop spends more time per tensor than the memcpy
 * of its bytes. Everything here is an accelerator only: it does the common case and hands
 * anything else back, and the Python code, which owns every check and error message, does
 * the rest (and everything, where this module was not built).
 *
 *   gather(dst, offsets, nbytes, sources, start[, tensor_types[, stream[, stop[, shift]]]]) -> index
 *                                                                     sources[i] -> dst[offsets[i] - shift:]
 *   destinations(targets, nbytes) -> bytes                            per target, its address or 0
 *   scatter(src, offsets, nbytes, addresses, start[, stream]) -> index  src[offsets[i]:] -> addresses[i]
 *   copy(dst, src[, stream])                                          dst[:] = src (equal sizes)
 *
 * ``gather`` exports each tensor's buffer per push and copies it, with the GIL released while
 * bytes move: a trainer's tensors may be new objects every push. A rank's targets are the
 * same for every version of a layout, so it asks for their addresses once (``destinations``,
 * 0 where the C copy may not write) and keeps the targets alive with them; ``scatter`` then
 * reads only the three uint64 arrays and copies a whole bucket with the GIL released (3.8 ->
 * 3.1 ms per 16k tensors of 4 KiB, against one buffer export per tensor).
 * ``stream`` copies with streaming (non-temporal) stores, for destinations nobody reads
 * soon: a slot much larger than the cache, or a model's weights. A cached store first reads
 * the destination line it writes (3 bytes of memory traffic per byte copied, 2 here), and
 * glibc takes the streaming path only above 3/4 of the cache size it believes in, which a VM
 * may misreport as hundreds of MiB. A slot small enough to stay in the cache until the
 * rank reads it is faster with cached stores: the caller decides.
 * Each stops at the first item it cannot copy exactly (no C-contiguous buffer, the wrong
 * size, None, read-only: address 0 for ``scatter``) and returns its index; the caller takes
 * that item and calls again from the next one. A span outside the flat buffer is a caller
 * bug (the planner and the BUCKET check place every span inside its slot) and raises
 * ValueError before any byte of its batch moves.
 *
 * torch tensors export no buffer: ``gather`` takes those whose type is exactly one of
 * ``tensor_types`` by their own accessors (is_cpu, is_contiguous(), is_neg(), nbytes,
 * data_ptr()), and keeps the GIL over such a batch: holding no buffer, it must not let
 * Python code resize one mid-copy.
 */
#include "_shared.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define BATCH 256                      /* buffers held at once: bounds the stack use */
#define GIL_FREE_BYTES (256 * 1024)    /* below this, dropping the GIL costs more than it frees */
#define STREAM_MIN_BYTES 256           /* below this the aligned head and tail are most of the copy */
#define FAST_NUMPY_BYTES (16 * 1024)   /* arrays up to this size are read from their fields (numpy_bytes) */

/* 64 bytes from src to dst (64-byte aligned) by non-temporal stores. */
#if defined(__SSE2__)
static inline void stream_line(char *dst, const char *src) {
    __m128i a = _mm_loadu_si128((const __m128i *)src), b = _mm_loadu_si128((const __m128i *)(src + 16));
    __m128i c = _mm_loadu_si128((const __m128i *)(src + 32)), d = _mm_loadu_si128((const __m128i *)(src + 48));
    _mm_stream_si128((__m128i *)dst, a);
    _mm_stream_si128((__m128i *)(dst + 16), b);
    _mm_stream_si128((__m128i *)(dst + 32), c);
    _mm_stream_si128((__m128i *)(dst + 48), d);
}
#endif

#define STREAM_PAGE 4096

/* Whole 64-byte lines by 32-byte non-temporal stores, where the CPU has AVX2 (decided at import,
 * ``STREAM_SIMD`` says which; ``WEIGHTSTREAM_SIMD=sse2`` keeps the SSE2 path below). Measured on
 * a 2-core AMD EPYC VM, 1 GiB x 64 to direct ranks, whose copies out of the ring are these
 * (running medians of interleaved laps): 2 ranks 140.5 / 149.6 / 146.9 / 146.1 ms a push
 * against 152.4 / 149.6 / 153.6 / 147.6 through SSE2's stores, 1 rank 75.6 / 67.8 against
 * 78.2 / 76.8: never slower, 0-12 % faster. The SSE2 path's four-pages-at-a-time order made the
 * AVX2 stores slower there (176 ms), so this one runs straight through. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define HAVE_AVX2_PATH 1
__attribute__((target("avx2"))) static void stream_lines_avx2(char *dst, const char *src, Py_ssize_t n) {
    for (Py_ssize_t at = 0; at < n; at += 64) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(src + at));
        __m256i b = _mm256_loadu_si256((const __m256i *)(src + at + 32));
        _mm256_stream_si256((__m256i *)(dst + at), a);
        _mm256_stream_si256((__m256i *)(dst + at + 32), b);
    }
}
#endif
static int stream_avx2 = 0; /* set at import: the CPU has AVX2 and WEIGHTSTREAM_SIMD is not "sse2" */

/* dst[:n] = src[:n]. Streaming: cached stores up to dst's next 64-byte line, then whole lines
 * by non-temporal stores, then the tail; the caller fences (stream_fence) before anyone
 * else may read dst. On the SSE2 path four pages are copied a line of each in turn, as glibc's own streaming
 * path does: on the Intel VM 1 GiB in 16 MiB copies took 87 ms so against 98 ms a page at a
 * time (reading 4 DRAM pages at once). Overlapping ranges, and anything without SSE2, take memmove. */
static void copy_bytes(char *dst, const char *src, Py_ssize_t n, int stream) {
#if defined(__SSE2__)
    if (stream && n >= STREAM_MIN_BYTES && (dst + n <= src || src + n <= dst)) {
        Py_ssize_t head = (Py_ssize_t)((64 - ((uintptr_t)dst & 63)) & 63);
        memcpy(dst, src, head);
        dst += head, src += head, n -= head;
#ifdef HAVE_AVX2_PATH
        if (stream_avx2) { /* dst is 64-byte aligned here: whole lines, then the tail */
            Py_ssize_t lines = n & ~(Py_ssize_t)63;
            stream_lines_avx2(dst, src, lines);
            dst += lines, src += lines, n -= lines;
        }
#endif
        for (; n >= 4 * STREAM_PAGE; n -= 4 * STREAM_PAGE, dst += 4 * STREAM_PAGE, src += 4 * STREAM_PAGE)
            for (Py_ssize_t at = 0; at < STREAM_PAGE; at += 64) {
                stream_line(dst + at, src + at);
                stream_line(dst + STREAM_PAGE + at, src + STREAM_PAGE + at);
                stream_line(dst + 2 * STREAM_PAGE + at, src + 2 * STREAM_PAGE + at);
                stream_line(dst + 3 * STREAM_PAGE + at, src + 3 * STREAM_PAGE + at);
            }
        for (; n >= 64; n -= 64, dst += 64, src += 64) stream_line(dst, src);
        memcpy(dst, src, n);
        return;
    }
#else
    (void)stream;
#endif
    memmove(dst, src, n);
}

/* Streaming stores are weakly ordered: fence them before the copy is reported done, so a
 * bucket published (or acked) afterwards is read whole by the other process. */
static void stream_fence(int stream) {
#if defined(__SSE2__)
    if (stream) _mm_sfence();
#else
    (void)stream;
#endif
}

typedef struct {
    Py_buffer flat;
    /* tuples: a torch accessor may run Python code (a TorchFunctionMode), which must not be able
     * to shrink what is being walked */
    PyObject *offsets, *nbytes, *items;
    Py_ssize_t count;
} Spans;

static void spans_release(Spans *s) {
    if (s->flat.obj != NULL) PyBuffer_Release(&s->flat);
    Py_XDECREF(s->offsets);
    Py_XDECREF(s->nbytes);
    Py_XDECREF(s->items);
}

static int spans_open(Spans *s, PyObject *args) {
    PyObject *flat, *offsets, *nbytes, *items;
    memset(s, 0, sizeof(*s));
    if (!PyArg_ParseTuple(args, "OOOO", &flat, &offsets, &nbytes, &items)) return -1;
    if (PyObject_GetBuffer(flat, &s->flat, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
        return -1;
    if ((s->offsets = PySequence_Tuple(offsets)) == NULL || (s->nbytes = PySequence_Tuple(nbytes)) == NULL ||
        (s->items = PySequence_Tuple(items)) == NULL)
        return -1;
    s->count = PyTuple_GET_SIZE(s->items);
    if (PyTuple_GET_SIZE(s->offsets) != s->count || PyTuple_GET_SIZE(s->nbytes) != s->count) {
        PyErr_Format(PyExc_ValueError, "offsets, nbytes and items: expected equal lengths, got %zd, %zd and %zd",
                     PyTuple_GET_SIZE(s->offsets), PyTuple_GET_SIZE(s->nbytes), s->count);
        return -1;
    }
    return 0;
}

static int size_at(PyObject *seq, Py_ssize_t i, const char *what, Py_ssize_t *out) {
    Py_ssize_t v = PyNumber_AsSsize_t(PyTuple_GET_ITEM(seq, i), PyExc_OverflowError);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < 0) {
        PyErr_Format(PyExc_ValueError, "%s[%zd]: expected a non-negative int, got %zd", what, i, v);
        return -1;
    }
    *out = v;
    return 0;
}

static PyObject *str_is_cpu, *str_is_contiguous, *str_is_neg, *str_nbytes, *str_data_ptr;

/* A torch tensor's bytes, read through its accessors: 1 if it is a contiguous CPU tensor of
 * exactly ``size`` bytes whose memory holds its values as they are (no lazy negation bit),
 * with its address in *ptr; 0 if not (the caller's checked path takes it). */
static int tensor_bytes(PyObject *item, PyObject *tensor_types, Py_ssize_t size, void **ptr) {
    if (!is_one_of(item, tensor_types)) return 0;
    PyObject *is_cpu = PyObject_GetAttr(item, str_is_cpu);
    PyObject *contiguous = is_cpu == Py_True ? PyObject_CallMethodNoArgs(item, str_is_contiguous) : NULL;
    PyObject *negated = contiguous == Py_True ? PyObject_CallMethodNoArgs(item, str_is_neg) : NULL;
    PyObject *nbytes = negated == Py_False ? PyObject_GetAttr(item, str_nbytes) : NULL;
    Py_ssize_t n = nbytes != NULL ? PyNumber_AsSsize_t(nbytes, PyExc_OverflowError) : -1;
    PyObject *address = n == size ? PyObject_CallMethodNoArgs(item, str_data_ptr) : NULL;
    *ptr = address != NULL ? PyLong_AsVoidPtr(address) : NULL;
    Py_XDECREF(is_cpu);
    Py_XDECREF(contiguous);
    Py_XDECREF(negated);
    Py_XDECREF(nbytes);
    Py_XDECREF(address);
    if (PyErr_Occurred()) PyErr_Clear();
    return address != NULL && (*ptr != NULL || size == 0);
}
/* NumPy's array type, from use_numpy(); NULL until then (gather then takes every array by the
 * buffer protocol). */
static PyTypeObject *ndarray_type = NULL;
static PyObject *last_descr = NULL; /* held: a freed dtype's address could come back as another */
static Py_ssize_t last_itemsize = 0;

/* A small C-contiguous exact ndarray's bytes, read from its fields: 1 with *ptr set if it holds
 * exactly ``size`` bytes, 0 if it is not such an array (the caller takes the buffer protocol).
 * Exporting a buffer costs ~50 ns an array, a quarter of copying a 4 KiB tensor and the
 * sender's largest per-tensor cost at 100k tensors. Only small ones: the caller keeps the GIL
 * while it copies them, having no export that would stop another thread resizing the array. */
static int numpy_bytes(PyObject *item, Py_ssize_t size, void **ptr) {
    if (ndarray_type == NULL || Py_TYPE(item) != ndarray_type || size > FAST_NUMPY_BYTES) return 0;
    if (numpy_head_ok < 0 && (numpy_head_ok = check_numpy_head(item)) < 0) {
        PyErr_Clear();
        numpy_head_ok = -1; /* undecided: the next array tries again */
        return 0;
    }
    NumpyArrayHead *head = (NumpyArrayHead *)item;
    if (!numpy_head_ok || !(head->flags & NPY_C_CONTIGUOUS_FLAG)) return 0;
    if (head->descr != last_descr) {
        PyObject *itemsize = PyObject_GetAttrString(head->descr, "itemsize");
        Py_ssize_t value = itemsize != NULL ? PyLong_AsSsize_t(itemsize) : -1;
        Py_XDECREF(itemsize);
        if (value <= 0) {
            PyErr_Clear();
            return 0;
        }
        Py_INCREF(head->descr);
        Py_XSETREF(last_descr, head->descr);
        last_itemsize = value;
    }
    Py_ssize_t count = last_itemsize;
    for (int k = 0; k < head->nd; k++)
        if (head->dimensions[k] < 0 || __builtin_mul_overflow(count, head->dimensions[k], &count)) return 0;
    if (count != size || (size && head->data == NULL)) return 0;
    *ptr = head->data;
    return 1;
}

/* The arrays a gather reads next lie apart in memory (each with its dims elsewhere): ask for
 * them a few items ahead, as prefetch_pairs does for describe's pass. */
static void prefetch_sources(PyObject *items, Py_ssize_t i, Py_ssize_t n) {
#if defined(__GNUC__)
    if (i + AHEAD < n) __builtin_prefetch(PyTuple_GET_ITEM(items, i + AHEAD));
    if (i + AHEAD / 2 < n) prefetch_dims(PyTuple_GET_ITEM(items, i + AHEAD / 2), ndarray_type);
#else
    (void)items, (void)i, (void)n;
#endif
}

static PyObject *use_numpy(PyObject *Py_UNUSED(self), PyObject *type) {
    if (!PyType_Check(type)) {
        PyErr_Format(PyExc_TypeError, "use_numpy: expected numpy.ndarray, got %s", Py_TYPE(type)->tp_name);
        return NULL;
    }
    Py_INCREF(type);
    Py_XSETREF(ndarray_type, (PyTypeObject *)type);
    Py_RETURN_NONE;
}

/* Ask for the first and last line of a destination, to be written. A streaming copy writes
 * those two lines by cached stores (they are shared with whatever lies around it), and a
 * cached store to a line not in the cache holds up every store behind it until the line
 * arrives from memory: at 4 KiB tensors that stall was a quarter of the copy. */
static inline void prefetch_ends(char *dst, Py_ssize_t n) {
#if defined(__GNUC__)
    if (n <= 0) return;
    __builtin_prefetch(dst, 1, 3);
    __builtin_prefetch(dst + n - 1, 1, 3);
#else
    (void)dst, (void)n;
#endif
}

/* One batch of a gather: the tensors held[k] into the slot at at[k], then the fence. Tensors
 * that lie back to back in memory and in the slot (views into a trainer's flat parameter
 * buffer) are copied as one run (100k views of 4 KiB through a ring: 23.7 -> 22.0 ms alone). */
static void copy_batch(char **at, Py_buffer *held, int n, int stream) {
    if (stream && n) prefetch_ends(at[0], held[0].len);
    for (int k = 0; k < n;) {
        char *dst = at[k];
        const char *src = held[k].buf;
        Py_ssize_t len = held[k].len;
        for (k++; k < n && held[k].len && at[k] == dst + len && (const char *)held[k].buf == src + len; k++)
            len += held[k].len;
        if (stream && k < n) /* one copy ahead: a 4 KiB copy takes longer than the fetch */
            prefetch_ends(at[k], held[k].len);
        if (len) /* an empty tensor may have no address at all */
            copy_bytes(dst, src, len, stream);
    }
    stream_fence(stream);
}

/* Gather items [start, ...) until one cannot be copied exactly; return its index (count if none). */
static PyObject *gather(PyObject *Py_UNUSED(self), PyObject *args) {
    Spans s;
    Py_ssize_t start, stop = PY_SSIZE_T_MAX, shift = 0;
    Py_ssize_t nargs = PyTuple_GET_SIZE(args);
    PyObject *tensor_types = nargs >= 6 ? PyTuple_GET_ITEM(args, 5) : NULL;
    PyObject *stream_arg = nargs >= 7 ? PyTuple_GET_ITEM(args, 6) : Py_False;
    int stream = 0;
    if (nargs < 5 || nargs > 9 || (tensor_types != NULL && !PyTuple_Check(tensor_types)) ||
        (stream = PyObject_IsTrue(stream_arg)) < 0 ||
        (start = PyNumber_AsSsize_t(PyTuple_GET_ITEM(args, 4), PyExc_OverflowError)) < 0 ||
        (nargs >= 8 && (stop = PyNumber_AsSsize_t(PyTuple_GET_ITEM(args, 7), PyExc_OverflowError)) < 0) ||
        (nargs == 9 && (shift = PyNumber_AsSsize_t(PyTuple_GET_ITEM(args, 8), PyExc_OverflowError)) < 0)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "expected (dst, offsets, nbytes, sources, start[, tensor_types[, stream[, stop"
                                             "[, shift]]]]) with start, stop, shift >= 0 and tensor_types a tuple");
        return NULL;
    }
    PyObject *rest = PyTuple_GetSlice(args, 0, 4);
    if (rest == NULL) return NULL;
    int opened = spans_open(&s, rest);
    Py_DECREF(rest);
    if (opened < 0) {
        spans_release(&s);
        return NULL;
    }
    if (stop < s.count) s.count = stop; /* only [start, stop): the sequences stay whole, no slice is made */
    char *flat = (char *)s.flat.buf;
    Py_buffer held[BATCH];
    char *at[BATCH];
    Py_ssize_t i = start < s.count ? start : s.count;
    int stopped = 0, failed = 0;
    while (i < s.count && !stopped && !failed) {
        int n = 0, raw = 0;
        Py_ssize_t batch_bytes = 0;
        for (; n < BATCH && i < s.count; i++) {
            prefetch_sources(s.items, i, s.count);
            PyObject *item = PyTuple_GET_ITEM(s.items, i);
            Py_ssize_t offset, size;
            if (size_at(s.offsets, i, "offsets", &offset) < 0 || size_at(s.nbytes, i, "nbytes", &size) < 0) {
                failed = 1;
                break;
            }
            offset -= shift;
            if (offset < 0 || offset > s.flat.len || size > s.flat.len - offset) {
                PyErr_Format(PyExc_ValueError,
                             "span %zd: expected bytes [%zd, %zd) inside the %zd-byte buffer; "
                             "the plan and the buffer disagree", i, offset, offset + size, s.flat.len);
                failed = 1;
                break;
            }
            void *fast;
            if (numpy_bytes(item, size, &fast)) {
                held[n].buf = fast; /* no exporter, as for a torch tensor below */
                held[n].obj = NULL;
                held[n].len = size;
                raw = 1;
            } else if (item == Py_None || PyObject_GetBuffer(item, &held[n], PyBUF_C_CONTIGUOUS) < 0) {
                PyErr_Clear(); /* no buffer: a torch tensor, or not ours to copy (the caller's checked path) */
                void *ptr;
                if (tensor_types == NULL || !tensor_bytes(item, tensor_types, size, &ptr)) {
                    stopped = 1;
                    break;
                }
                held[n].buf = ptr; /* no exporter: PyBuffer_Release below is a no-op for it */
                held[n].obj = NULL;
                held[n].len = size;
                raw = 1;
            }
            if (held[n].len != size) {
                PyBuffer_Release(&held[n]);
                stopped = 1;
                break;
            }
            at[n] = flat + offset;
            batch_bytes += size;
            n++;
        }
        if (!failed) {
            if (batch_bytes >= GIL_FREE_BYTES && !raw) {
                Py_BEGIN_ALLOW_THREADS
                copy_batch(at, held, n, stream);
                Py_END_ALLOW_THREADS
            } else {
                copy_batch(at, held, n, stream);
            }
        }
        for (int k = 0; k < n; k++) PyBuffer_Release(&held[k]);
    }
    spans_release(&s);
    if (failed) return NULL;
    return PyLong_FromSsize_t(i);
}

/* A C-contiguous buffer of 8-byte ints, read-only: offsets, sizes or addresses. */
static int u64_buffer(PyObject *obj, Py_buffer *view, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    const char *f = view->format != NULL ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    if (view->itemsize != 8 || f[1] != '\0' || strchr("QqLlNn", f[0]) == NULL) {
        PyErr_Format(PyExc_TypeError, "%s: expected a buffer of 8-byte ints (a uint64 array), got format %s of %zd bytes",
                     what, view->format != NULL ? view->format : "B", view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *destinations(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *targets_in, *nbytes_in;
    if (!PyArg_ParseTuple(args, "OO", &targets_in, &nbytes_in)) return NULL;
    PyObject *targets = PySequence_Tuple(targets_in);
    PyObject *nbytes = targets != NULL ? PySequence_Tuple(nbytes_in) : NULL;
    PyObject *out = NULL;
    if (nbytes == NULL) goto done;
    Py_ssize_t n = PyTuple_GET_SIZE(targets);
    if (PyTuple_GET_SIZE(nbytes) != n) {
        PyErr_Format(PyExc_ValueError, "targets and nbytes: expected equal lengths, got %zd and %zd", n,
                     PyTuple_GET_SIZE(nbytes));
        goto done;
    }
    if ((out = PyBytes_FromStringAndSize(NULL, n * 8)) == NULL) goto done;
    uint64_t *address = (uint64_t *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t size;
        if (size_at(nbytes, i, "nbytes", &size) < 0) {
            Py_CLEAR(out);
            goto done;
        }
        PyObject *target = PyTuple_GET_ITEM(targets, i);
        Py_buffer view;
        address[i] = 0;
        if (target == Py_None) continue;
        if (PyObject_GetBuffer(target, &view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
            PyErr_Clear(); /* not writable, or not a buffer: the caller's path */
            continue;
        }
        if (view.len == size) address[i] = view.buf != NULL ? (uint64_t)(uintptr_t)view.buf : 1; /* 1: empty, never written */
        PyBuffer_Release(&view);
    }
done:
    Py_XDECREF(targets);
    Py_XDECREF(nbytes);
    return out;
}

/* Spans [first, stop) of src to their addresses, then the fence. */
static void scatter_spans(const char *src, const uint64_t *at, const uint64_t *size, const uint64_t *to,
                          Py_ssize_t first, Py_ssize_t stop, int stream) {
    if (stream && first < stop) prefetch_ends((char *)(uintptr_t)to[first], (Py_ssize_t)size[first]);
    for (Py_ssize_t k = first; k < stop;) {
        uint64_t dst = to[k], from = at[k], len = size[k];
        for (k++; k < stop && size[k] && to[k] == dst + len && at[k] == from + len; k++) /* back to back: one run */
            len += size[k];
        if (stream && k < stop) /* one copy ahead, as in copy_batch */
            prefetch_ends((char *)(uintptr_t)to[k], (Py_ssize_t)size[k]);
        if (len) copy_bytes((char *)(uintptr_t)dst, src + from, (Py_ssize_t)len, stream);
    }
    stream_fence(stream);
}

static PyObject *scatter(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *src_obj, *offsets_obj, *nbytes_obj, *address_obj;
    Py_ssize_t start;
    int stream = 0;
    if (!PyArg_ParseTuple(args, "OOOOn|p", &src_obj, &offsets_obj, &nbytes_obj, &address_obj, &start, &stream))
        return NULL;
    Py_buffer src, offsets, nbytes, address;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    PyObject *result = NULL;
    int have = 0;
    if (u64_buffer(offsets_obj, &offsets, "offsets") < 0) goto release;
    have = 1;
    if (u64_buffer(nbytes_obj, &nbytes, "nbytes") < 0) goto release;
    have = 2;
    if (u64_buffer(address_obj, &address, "addresses") < 0) goto release;
    have = 3;
    Py_ssize_t count = address.len / 8;
    if (offsets.len / 8 != count || nbytes.len / 8 != count) {
        PyErr_Format(PyExc_ValueError, "offsets, nbytes and addresses: expected equal lengths, got %zd, %zd and %zd",
                     offsets.len / 8, nbytes.len / 8, count);
        goto release;
    }
    if (start < 0) {
        PyErr_SetString(PyExc_ValueError, "start: expected a non-negative int");
        goto release;
    }
    const uint64_t *at = (const uint64_t *)offsets.buf, *size = (const uint64_t *)nbytes.buf;
    const uint64_t *to = (const uint64_t *)address.buf;
    Py_ssize_t stop = start < count ? start : count, total = 0;
    /* every span is checked before any byte moves */
    for (; stop < count && to[stop] != 0; stop++) {
        if (at[stop] > (uint64_t)src.len || size[stop] > (uint64_t)src.len - at[stop]) {
            PyErr_Format(PyExc_ValueError,
                         "span %zd: expected bytes [%llu, %llu) inside the %zd-byte buffer; the plan and the buffer disagree",
                         stop, (unsigned long long)at[stop], (unsigned long long)(at[stop] + size[stop]), src.len);
            goto release;
        }
        total += (Py_ssize_t)size[stop];
    }
    Py_ssize_t first = start < count ? start : count;
    if (total >= GIL_FREE_BYTES) { /* no Python object is touched per span */
        Py_BEGIN_ALLOW_THREADS
        scatter_spans((const char *)src.buf, at, size, to, first, stop, stream);
        Py_END_ALLOW_THREADS
    } else {
        scatter_spans((const char *)src.buf, at, size, to, first, stop, stream);
    }
    result = PyLong_FromSsize_t(stop);
release:
    if (have >= 3) PyBuffer_Release(&address);
    if (have >= 2) PyBuffer_Release(&nbytes);
    if (have >= 1) PyBuffer_Release(&offsets);
    PyBuffer_Release(&src);
    return result;
}

static PyObject *copy(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *dst_obj, *src_obj;
    int stream = 0;
    Py_buffer dst, src;
    if (!PyArg_ParseTuple(args, "OO|p", &dst_obj, &src_obj, &stream)) return NULL;
    if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) return NULL;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&dst);
        return NULL;
    }
    if (dst.len != src.len) {
        PyErr_Format(PyExc_ValueError, "copy: expected a destination of the source's %zd bytes, got %zd", src.len, dst.len);
    } else if (dst.len >= GIL_FREE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        copy_bytes(dst.buf, src.buf, dst.len, stream);
        stream_fence(stream);
        Py_END_ALLOW_THREADS
    } else if (dst.len) {
        copy_bytes(dst.buf, src.buf, dst.len, stream);
        stream_fence(stream);
    }
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"gather", gather, METH_VARARGS,
     "gather(dst, offsets, nbytes, sources, start[, tensor_types[, stream[, stop[, shift]]]]) -> int\n\n"
     "Copy each C-contiguous source of exactly nbytes[i] bytes into dst at offsets[i] - shift, from index start\n"
     "up to stop (tuples are taken as they are: pass tuples to call it often over parts of long sequences)\n"
     "(a buffer, or a contiguous CPU tensor whose type is exactly one of tensor_types), by streaming stores\n"
     "if stream; return the index of the first source it could not copy (len(sources) when all were)."},
    {"destinations", destinations, METH_VARARGS,
     "destinations(targets, nbytes) -> bytes\n\n"
     "Per target, as a native uint64: the address of its writable C-contiguous buffer of exactly nbytes[i]\n"
     "bytes, or 0 where there is none (None, read-only, strided, another size)."},
    {"scatter", scatter, METH_VARARGS,
     "scatter(src, offsets, nbytes, addresses, start[, stream]) -> int\n\n"
     "Copy src[offsets[i]:offsets[i] + nbytes[i]] to addresses[i] (buffers of 8-byte ints; the addresses\n"
     "from destinations(), over targets the caller keeps alive), from index start on, by streaming stores if\n"
     "stream; return the index of the first address that is 0 (len when none is)."},
    {"copy", copy, METH_VARARGS,
     "copy(dst, src[, stream]) -> None\n\n"
     "dst[:] = src for two C-contiguous buffers of equal size (dst writable), the GIL released over big\n"
     "copies, by streaming stores if stream."},
    {"use_numpy", use_numpy, METH_O,
     "use_numpy(ndarray) -> None\n\n"
     "NumPy's array type: gather then reads small C-contiguous arrays' bytes from their fields."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_spans", .m_doc = NULL, .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__spans(void) {
#ifdef HAVE_AVX2_PATH
    const char *simd = getenv("WEIGHTSTREAM_SIMD");
    __builtin_cpu_init();
    stream_avx2 = __builtin_cpu_supports("avx2") && !(simd != NULL && strcmp(simd, "sse2") == 0);
#endif
    str_is_cpu = PyUnicode_InternFromString("is_cpu");
    str_is_contiguous = PyUnicode_InternFromString("is_contiguous");
    str_is_neg = PyUnicode_InternFromString("is_neg");
    str_nbytes = PyUnicode_InternFromString("nbytes");
    str_data_ptr = PyUnicode_InternFromString("data_ptr");
    if (intern_shared() < 0 || !str_is_cpu || !str_is_contiguous || !str_is_neg || !str_nbytes || !str_data_ptr)
        return NULL;
    PyObject *m = PyModule_Create(&module);
#if defined(__SSE2__)
    const char *path = stream_avx2 ? "avx2" : "sse2";
#else
    const char *path = "none"; /* memmove */
#endif
    if (m != NULL && PyModule_AddStringConstant(m, "STREAM_SIMD", path) < 0) Py_CLEAR(m);
    return m;
}
