/* weightstream.native._ring: a bucket streamed through a small ring of shared memory.
 *
 * Through a slot much larger than the last-level cache every byte crosses DRAM four times
 * (the sender reads the tensor and writes the slot; a rank reads the slot and writes the
 * model). Through a ring small enough to stay in the cache, the rank reads what the sender
 * wrote a moment ago from the shared cache, and only the tensor's read and the model's write
 * reach DRAM. Two pieces make that possible without changing how a bucket is laid out:
 *
 *   RingMap(fd, ring_bytes, size)   a buffer of ``size`` bytes whose every ``ring_bytes`` are the
 *                                   same pages (file offset 0 mapped again and again), so a bucket's
 *                                   offset o lives at o % ring_bytes and a span across the wrap is
 *                                   still contiguous
 *   Control(buffer, offset)         the counters in a control block of the same segment: bytes
 *                                   produced, bytes each rank consumed, and futex words to sleep on
 *
 * The sender may write [o, e) only once every rank consumed past e - ring_bytes; a rank may read
 * [o, e) only once the sender produced past e. A waiter sleeps on a futex (never spins), with a
 * timeout so that the caller can look for a dead peer, and asks to be woken only some way past
 * what it needs (``slack``), so that the two sides do not wake each other for every piece.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if defined(__linux__)
#include <errno.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONSUMERS 64
#define LINE 64

/* One cache line each: the producer's and every consumer's counters are written by one
 * process and read by the others. */
typedef struct {
    _Atomic uint64_t produced;
    _Atomic uint64_t need;    /* the producer sleeps until every consumer passed need - ring_bytes */
    _Atomic uint32_t futex;   /* bumped to wake the producer */
    _Atomic uint32_t waiting;
    _Atomic uint32_t aborted; /* the producer gave the bucket up: consumers stop waiting */
    _Atomic uint32_t pad0;
    _Atomic uint64_t mask;    /* the consumers of this bucket, by index */
    _Atomic uint64_t ring_bytes;
    char pad[LINE - 48];
} ProducerLine;

typedef struct {
    _Atomic uint64_t consumed;
    _Atomic uint64_t need; /* the consumer sleeps until the producer passed need */
    _Atomic uint32_t futex;
    _Atomic uint32_t waiting;
    char pad[LINE - 24];
} ConsumerLine;

typedef struct {
    ProducerLine producer;
    ConsumerLine consumer[MAX_CONSUMERS];
} ControlBlock;

static long futex_wait(_Atomic uint32_t *word, uint32_t seen, double seconds) {
    struct timespec ts = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
    /* not FUTEX_PRIVATE: the word lives in memory shared between processes */
    return syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, seen, &ts, NULL, 0);
}

static void futex_wake(_Atomic uint32_t *word) {
    atomic_fetch_add(word, 1);
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
}

/* ---------------------------------------------------------------- RingMap */

typedef struct {
    PyObject_HEAD
    char *base;
    Py_ssize_t size, reserved, ring_bytes;
    Py_ssize_t exports;
} RingMap;

static void ringmap_unmap(RingMap *self) {
    if (self->base != NULL) munmap(self->base, (size_t)self->reserved);
    self->base = NULL;
}

static int ringmap_init(RingMap *self, PyObject *args, PyObject *kwds) {
    int fd;
    Py_ssize_t ring_bytes, size;
    static char *kwlist[] = {"fd", "ring_bytes", "size", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "inn", kwlist, &fd, &ring_bytes, &size)) return -1;
    long page = sysconf(_SC_PAGESIZE);
    if (ring_bytes <= 0 || ring_bytes % page != 0 || size <= 0) {
        PyErr_Format(PyExc_ValueError, "RingMap: expected ring_bytes a positive multiple of the %ld-byte page and "
                                       "size > 0, got ring_bytes=%zd, size=%zd", page, ring_bytes, size);
        return -1;
    }
    if (self->base != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "RingMap: already mapped");
        return -1;
    }
    Py_ssize_t copies = (size + ring_bytes - 1) / ring_bytes;
    Py_ssize_t reserved = copies * ring_bytes;
    /* reserve the whole range first, then map the ring's pages over it, copy after copy */
    char *base = mmap(NULL, (size_t)reserved, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    for (Py_ssize_t k = 0; k < copies; k++) {
        int flags = MAP_SHARED | MAP_FIXED | (k == 0 ? MAP_POPULATE : 0);
        if (mmap(base + k * ring_bytes, (size_t)ring_bytes, PROT_READ | PROT_WRITE, flags, fd, 0) == MAP_FAILED) {
            PyErr_SetFromErrno(PyExc_OSError);
            munmap(base, (size_t)reserved);
            return -1;
        }
    }
    self->base = base;
    self->size = size;
    self->reserved = reserved;
    self->ring_bytes = ring_bytes;
    return 0;
}

static void ringmap_dealloc(RingMap *self) {
    ringmap_unmap(self); /* a view holds a reference: no export is left by now */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int ringmap_getbuffer(RingMap *self, Py_buffer *view, int flags) {
    if (self->base == NULL) {
        PyErr_SetString(PyExc_ValueError, "RingMap is closed");
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->base, self->size, 0, flags) < 0) return -1;
    self->exports++;
    return 0;
}

static void ringmap_releasebuffer(RingMap *self, Py_buffer *Py_UNUSED(view)) { self->exports--; }

static PyObject *ringmap_close(RingMap *self, PyObject *Py_UNUSED(ignored)) {
    if (self->exports > 0) {
        PyErr_Format(PyExc_BufferError, "RingMap: %zd view(s) still use the mapping", self->exports);
        return NULL;
    }
    ringmap_unmap(self);
    Py_RETURN_NONE;
}

static PyObject *ringmap_closed(RingMap *self, void *Py_UNUSED(closure)) { return PyBool_FromLong(self->base == NULL); }

static PyBufferProcs ringmap_as_buffer = {(getbufferproc)ringmap_getbuffer, (releasebufferproc)ringmap_releasebuffer};

static PyMethodDef ringmap_methods[] = {
    {"close", (PyCFunction)ringmap_close, METH_NOARGS, "Unmap; BufferError while a view is alive."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef ringmap_getset[] = {
    {"closed", (getter)ringmap_closed, NULL, "whether close() ran", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RingMapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "weightstream.native._ring.RingMap",
    .tp_basicsize = sizeof(RingMap),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "RingMap(fd, ring_bytes, size): size bytes over the first ring_bytes of fd, repeated",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ringmap_init,
    .tp_dealloc = (destructor)ringmap_dealloc,
    .tp_as_buffer = &ringmap_as_buffer,
    .tp_methods = ringmap_methods,
    .tp_getset = ringmap_getset,
};

/* ---------------------------------------------------------------- Control */

typedef struct {
    PyObject_HEAD
    Py_buffer buffer;
    ControlBlock *block;
} Control;

static int control_init(Control *self, PyObject *args, PyObject *Py_UNUSED(kwds)) {
    PyObject *obj;
    Py_ssize_t offset;
    if (!PyArg_ParseTuple(args, "On", &obj, &offset)) return -1;
    if (self->block != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Control: already open");
        return -1;
    }
    if (PyObject_GetBuffer(obj, &self->buffer, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (offset < 0 || offset > self->buffer.len || self->buffer.len - offset < (Py_ssize_t)sizeof(ControlBlock) ||
        ((uintptr_t)self->buffer.buf + (uintptr_t)offset) % LINE != 0) {
        PyErr_Format(PyExc_ValueError, "Control: expected %zu bytes at a 64-byte aligned address in the buffer, "
                                       "got offset %zd of %zd bytes", sizeof(ControlBlock), offset, self->buffer.len);
        PyBuffer_Release(&self->buffer);
        return -1;
    }
    self->block = (ControlBlock *)((char *)self->buffer.buf + offset);
    return 0;
}

static void control_dealloc(Control *self) {
    if (self->block != NULL) PyBuffer_Release(&self->buffer);
    self->block = NULL;
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int control_open(Control *self) {
    if (self->block == NULL) {
        PyErr_SetString(PyExc_ValueError, "Control is closed");
        return -1;
    }
    return 0;
}

static PyObject *control_release(Control *self, PyObject *Py_UNUSED(ignored)) {
    if (self->block != NULL) PyBuffer_Release(&self->buffer);
    self->block = NULL;
    Py_RETURN_NONE;
}

static int consumer_index(Py_ssize_t index) {
    if (index < 0 || index >= MAX_CONSUMERS) {
        PyErr_Format(PyExc_ValueError, "consumer index: expected 0..%d, got %zd", MAX_CONSUMERS - 1, index);
        return -1;
    }
    return 0;
}

/* The least any consumer of the bucket consumed (UINT64_MAX with no consumer). */
static uint64_t least_consumed(ControlBlock *b) {
    uint64_t mask = atomic_load(&b->producer.mask), least = UINT64_MAX;
    for (int i = 0; mask; i++, mask >>= 1) {
        if (mask & 1) {
            uint64_t c = atomic_load(&b->consumer[i].consumed);
            if (c < least) least = c;
        }
    }
    return least;
}

/* Wake every consumer asleep on less than ``produced`` (all of them if force). */
static void wake_consumers(ControlBlock *b, uint64_t produced, int force) {
    uint64_t mask = atomic_load(&b->producer.mask);
    for (int i = 0; mask; i++, mask >>= 1) {
        ConsumerLine *c = &b->consumer[i];
        if ((mask & 1) && atomic_load(&c->waiting) && (force || produced >= atomic_load(&c->need))) futex_wake(&c->futex);
    }
}

/* May the producer write up to end? Every consumer passed end - ring_bytes. */
static int space_for(ControlBlock *b, uint64_t end) {
    uint64_t ring = atomic_load(&b->producer.ring_bytes);
    return end <= ring || least_consumed(b) >= end - ring;
}

static void wake_producer(ControlBlock *b, int force) {
    ProducerLine *p = &b->producer;
    if (atomic_load(&p->waiting) && (force || space_for(b, atomic_load(&p->need)))) futex_wake(&p->futex);
}

/* reset(mask, ring_bytes): the producer, before it publishes a bucket in this slot (every rank
 * acked the last one, so nobody else touches the block now). */
static PyObject *control_reset(Control *self, PyObject *args) {
    unsigned long long mask;
    Py_ssize_t ring_bytes;
    if (!PyArg_ParseTuple(args, "Kn", &mask, &ring_bytes) || control_open(self) < 0) return NULL;
    if (ring_bytes <= 0) {
        PyErr_Format(PyExc_ValueError, "ring_bytes: expected > 0, got %zd", ring_bytes);
        return NULL;
    }
    ControlBlock *b = self->block;
    for (int i = 0; i < MAX_CONSUMERS; i++) {
        atomic_store(&b->consumer[i].consumed, 0);
        atomic_store(&b->consumer[i].need, UINT64_MAX);
    }
    atomic_store(&b->producer.produced, 0);
    atomic_store(&b->producer.need, 0);
    atomic_store(&b->producer.aborted, 0);
    atomic_store(&b->producer.ring_bytes, (uint64_t)ring_bytes);
    atomic_store(&b->producer.mask, (uint64_t)mask);
    Py_RETURN_NONE;
}

/* produce(end[, final]): bytes [0, end) of the bucket are written. */
static PyObject *control_produce(Control *self, PyObject *args) {
    unsigned long long end;
    int final = 0;
    if (!PyArg_ParseTuple(args, "K|p", &end, &final) || control_open(self) < 0) return NULL;
    atomic_store(&self->block->producer.produced, (uint64_t)end);
    wake_consumers(self->block, (uint64_t)end, final);
    Py_RETURN_NONE;
}

/* abort(): the producer gives the bucket up; every waiting consumer wakes and sees it. */
static PyObject *control_abort(Control *self, PyObject *Py_UNUSED(ignored)) {
    if (control_open(self) < 0) return NULL;
    atomic_store(&self->block->producer.aborted, 1);
    wake_consumers(self->block, 0, 1);
    Py_RETURN_NONE;
}

/* wait_space(end, slack, timeout) -> bool: until every consumer passed end - ring_bytes. Asleep, it asks
 * to be woken only at end + slack, but returns on any wake once end is free. */
static PyObject *control_wait_space(Control *self, PyObject *args) {
    unsigned long long end, slack;
    double timeout;
    if (!PyArg_ParseTuple(args, "KKd", &end, &slack, &timeout) || control_open(self) < 0) return NULL;
    ControlBlock *b = self->block;
    ProducerLine *p = &b->producer;
    if (space_for(b, end)) Py_RETURN_TRUE;
    int ok;
    Py_BEGIN_ALLOW_THREADS
    /* consumers asleep short of their slack must not wait for what we now wait for */
    wake_consumers(b, atomic_load(&p->produced), 1);
    uint32_t seen = atomic_load(&p->futex);
    atomic_store(&p->need, end + slack);
    atomic_store(&p->waiting, 1);
    ok = space_for(b, end);
    if (!ok) {
        futex_wait(&p->futex, seen, timeout);
        ok = space_for(b, end);
    }
    atomic_store(&p->waiting, 0);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(ok);
}

/* wait_data(index, end, limit, slack, timeout) -> 1 (produced past end), 0 (timed out), -1 (aborted).
 * Asleep, it asks to be woken at min(end + slack, limit). */
static PyObject *control_wait_data(Control *self, PyObject *args) {
    Py_ssize_t index;
    unsigned long long end, limit, slack;
    double timeout;
    if (!PyArg_ParseTuple(args, "nKKKd", &index, &end, &limit, &slack, &timeout) || control_open(self) < 0 ||
        consumer_index(index) < 0)
        return NULL;
    ControlBlock *b = self->block;
    ProducerLine *p = &b->producer;
    ConsumerLine *c = &b->consumer[index];
    if (atomic_load(&p->produced) >= end) return PyLong_FromLong(1);
    if (atomic_load(&p->aborted)) return PyLong_FromLong(-1);
    int state;
    Py_BEGIN_ALLOW_THREADS
    wake_producer(b, 1); /* a producer asleep short of its slack must not wait for what we now wait for */
    uint32_t seen = atomic_load(&c->futex);
    uint64_t want = end + slack < limit ? end + slack : limit;
    atomic_store(&c->need, want > end ? want : end);
    atomic_store(&c->waiting, 1);
    state = atomic_load(&p->produced) >= end;
    if (!state && !atomic_load(&p->aborted)) {
        futex_wait(&c->futex, seen, timeout);
        state = atomic_load(&p->produced) >= end;
    }
    if (!state && atomic_load(&p->aborted)) state = -1;
    atomic_store(&c->waiting, 0);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(state);
}

/* consume(index, end): this consumer is done with bytes [0, end) of the bucket. */
static PyObject *control_consume(Control *self, PyObject *args) {
    Py_ssize_t index;
    unsigned long long end;
    if (!PyArg_ParseTuple(args, "nK", &index, &end) || control_open(self) < 0 || consumer_index(index) < 0) return NULL;
    atomic_store(&self->block->consumer[index].consumed, (uint64_t)end);
    wake_producer(self->block, 0);
    Py_RETURN_NONE;
}

static PyObject *control_counters(Control *self, PyObject *Py_UNUSED(ignored)) {
    if (control_open(self) < 0) return NULL;
    ControlBlock *b = self->block;
    PyObject *consumed = PyList_New(0);
    if (consumed == NULL) return NULL;
    uint64_t mask = atomic_load(&b->producer.mask);
    for (int i = 0; mask; i++, mask >>= 1) {
        if (!(mask & 1)) continue;
        PyObject *v = PyLong_FromUnsignedLongLong(atomic_load(&b->consumer[i].consumed));
        if (v == NULL || PyList_Append(consumed, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(consumed);
            return NULL;
        }
        Py_DECREF(v);
    }
    return Py_BuildValue("KN", (unsigned long long)atomic_load(&b->producer.produced), consumed);
}

static PyMethodDef control_methods[] = {
    {"reset", (PyCFunction)control_reset, METH_VARARGS, "reset(mask, ring_bytes): a new bucket for these consumers"},
    {"produce", (PyCFunction)control_produce, METH_VARARGS, "produce(end[, final]): bytes [0, end) are written"},
    {"abort", (PyCFunction)control_abort, METH_NOARGS, "abort(): the bucket is given up"},
    {"wait_space", (PyCFunction)control_wait_space, METH_VARARGS,
     "wait_space(end, slack, timeout) -> bool: every consumer passed end - ring_bytes"},
    {"wait_data", (PyCFunction)control_wait_data, METH_VARARGS,
     "wait_data(index, end, limit, slack, timeout) -> 1 ready, 0 timed out, -1 aborted"},
    {"consume", (PyCFunction)control_consume, METH_VARARGS, "consume(index, end): done with bytes [0, end)"},
    {"counters", (PyCFunction)control_counters, METH_NOARGS, "(produced, [consumed per consumer])"},
    {"release", (PyCFunction)control_release, METH_NOARGS, "let go of the buffer"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ControlType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "weightstream.native._ring.Control",
    .tp_basicsize = sizeof(Control),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Control(buffer, offset): a ring's counters in shared memory",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)control_init,
    .tp_dealloc = (destructor)control_dealloc,
    .tp_methods = control_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_ring", .m_doc = NULL, .m_size = -1, .m_methods = NULL,
};

PyMODINIT_FUNC PyInit__ring(void) {
    if (PyType_Ready(&RingMapType) < 0 || PyType_Ready(&ControlType) < 0) return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL) return NULL;
    if (PyModule_AddObjectRef(mod, "RingMap", (PyObject *)&RingMapType) < 0 ||
        PyModule_AddObjectRef(mod, "Control", (PyObject *)&ControlType) < 0 ||
        PyModule_AddIntConstant(mod, "MAX_CONSUMERS", MAX_CONSUMERS) < 0 ||
        PyModule_AddIntConstant(mod, "CONTROL_BYTES", (long)sizeof(ControlBlock)) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
#else /* futexes and MAP_FIXED rings are Linux-only: importing this module fails elsewhere */
#error "weightstream.native._ring needs Linux"
#endif
