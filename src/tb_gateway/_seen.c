/* SeenTable: the CoAP endpoint's de-duplication table (coap/expiring.py's PeerWindowedMap) in C.
 *
 * The same rules, for (peer, message id) keys with 16-bit ids: at most ``window`` entries per peer (its
 * newest: the oldest goes as a new one comes, live or not), at most ``cap`` in all (the first to expire goes),
 * entries kept for the lifetime given at each put and dropped by ``expire``. What changes is the cost: the
 * Python map made a key tuple, an entry tuple, two queue tuples and a float per message and hashed the key
 * tuple at every step (a fifth of the CoAP lane's time at 80k requests/s). Here a peer's window is a ring of
 * slots found by one dict lookup on the peer and a scan of at most ``window`` ids; the expiry queues are
 * arrays. A slot is stamped by the put that filled it, so a queue entry whose slot was emptied or refilled
 * since is recognized as stale (the Python map compares expiry times: the same outcomes).
 *
 * Memory stays within the Python map's: a window's ring grows by doubling up to ``window`` slots, and a
 * window goes with its last live entry. References: a slot owns its value, the peers dict owns the windows,
 * and every queue entry owns a reference to its window (a window outlives its queue entries).
 */
#include "_speedups.h"

#include <stdint.h>

typedef struct {
    double expires_at;
    PyObject *value; /* owned; NULL once the entry is gone (expired, dropped, popped or overwritten) */
    uint64_t stamp;  /* which put filled the slot */
} SeenSlot;

typedef struct {
    PyObject_HEAD
    PyObject *peer; /* owned */
    SeenSlot *slots;
    uint16_t *mids; /* each slot's id, apart: a lookup scans 128 bytes, not the slots (a window of 64) */
    Py_ssize_t head, size, capacity; /* a ring: the oldest at head; gone slots stay until they reach it */
    Py_ssize_t live;
} SeenWindow;

typedef struct {
    double expires_at;
    SeenWindow *window; /* owned */
    uint64_t stamp;
    unsigned int mid;
} SeenQueued;

typedef struct {
    double lifetime;
    SeenQueued *entries;
    Py_ssize_t head, size, capacity; /* a ring, in expiry order (puts come with a non-decreasing now) */
} SeenQueue;

typedef struct {
    PyObject_HEAD
    PyObject *peers; /* peer -> SeenWindow */
    Py_ssize_t cap, window, live, queued;
    uint64_t stamp;
    SeenQueue *queues; /* one per lifetime, in the order the lifetimes were first used */
    Py_ssize_t nqueues;
} SeenTableObject;

static PyTypeObject SeenWindowType;
static PyTypeObject SeenTableType;

/* ---- windows ---- */

static void
seen_window_dealloc(SeenWindow *w)
{
    for (Py_ssize_t i = 0; i < w->size; i++) {
        Py_CLEAR(w->slots[(w->head + i) % w->capacity].value);
    }
    PyMem_Free(w->slots);
    PyMem_Free(w->mids);
    Py_XDECREF(w->peer);
    PyObject_Free(w);
}

static PyTypeObject SeenWindowType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tb_gateway._speedups._SeenWindow",
    .tp_basicsize = sizeof(SeenWindow),
    .tp_dealloc = (destructor)seen_window_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One peer's slots in a SeenTable.",
};

static SeenWindow *
seen_window_new(PyObject *peer)
{
    SeenWindow *w = PyObject_New(SeenWindow, &SeenWindowType);
    if (w == NULL) {
        return NULL;
    }
    w->peer = Py_NewRef(peer);
    w->slots = NULL;
    w->mids = NULL;
    w->head = w->size = w->capacity = w->live = 0;
    return w;
}

/* The slot holding mid's live entry (filled by put ``stamp`` when stamp != 0), or NULL. The whole array is
 * scanned in memory order, ring or not: a slot outside the ring is empty (its value NULL), and an id is live
 * in at most one slot (a put forgets the old one first). */
static SeenSlot *
seen_window_find(SeenWindow *w, unsigned int mid, uint64_t stamp)
{
    const uint16_t *mids = w->mids;
    for (Py_ssize_t i = 0; i < w->capacity; i++) {
        if (mids[i] == mid) {
            SeenSlot *slot = &w->slots[i];
            if (slot->value != NULL && (stamp == 0 || slot->stamp == stamp)) {
                return slot;
            }
        }
    }
    return NULL;
}

/* The window's gone slots at the front leave; an emptied window leaves the table. 0 or -1 */
static int
seen_trim(SeenTableObject *t, SeenWindow *w)
{
    while (w->size > 0 && w->slots[w->head].value == NULL) {
        w->head = (w->head + 1) % w->capacity;
        w->size--;
    }
    if (w->size > 0) {
        return 0;
    }
    PyObject *current = PyDict_GetItemWithError(t->peers, w->peer);
    if (current == (PyObject *)w) {
        return PyDict_DelItem(t->peers, w->peer);
    }
    return PyErr_Occurred() ? -1 : 0;
}

/* Empty a live slot: the counts first, then the value goes (its deallocation may run code that looks at
 * the table, which is consistent by then). The caller holds a reference to w. 0 or -1 */
static int
seen_forget(SeenTableObject *t, SeenWindow *w, SeenSlot *slot)
{
    PyObject *value = slot->value;
    slot->value = NULL;
    w->live--;
    t->live--;
    int rc = seen_trim(t, w);
    Py_DECREF(value);
    return rc;
}

/* ---- expiry queues ---- */

static SeenQueue *
seen_queue_for(SeenTableObject *t, double lifetime)
{
    for (Py_ssize_t i = 0; i < t->nqueues; i++) {
        if (t->queues[i].lifetime == lifetime) {
            return &t->queues[i];
        }
    }
    SeenQueue *grown = PyMem_Realloc(t->queues, (size_t)(t->nqueues + 1) * sizeof(SeenQueue));
    if (grown == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    t->queues = grown;
    SeenQueue *q = &t->queues[t->nqueues++];
    q->lifetime = lifetime;
    q->entries = NULL;
    q->head = q->size = q->capacity = 0;
    return q;
}

static SeenQueued *
seen_queue_front(SeenQueue *q)
{
    return q->size > 0 ? &q->entries[q->head] : NULL;
}

/* Drop the front entry (its window reference goes: a window may go with it) */
static void
seen_queue_pop(SeenTableObject *t, SeenQueue *q)
{
    SeenWindow *w = q->entries[q->head].window;
    q->entries[q->head].window = NULL;
    q->head = (q->head + 1) % q->capacity;
    q->size--;
    t->queued--;
    Py_DECREF(w);
}

static int
seen_queue_push(SeenTableObject *t, SeenQueue *q, double expires_at, SeenWindow *w, uint64_t stamp, unsigned int mid)
{
    if (q->size == q->capacity) {
        Py_ssize_t capacity = q->capacity ? 2 * q->capacity : 16;
        SeenQueued *entries = PyMem_Malloc((size_t)capacity * sizeof(SeenQueued));
        if (entries == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < q->size; i++) {
            entries[i] = q->entries[(q->head + i) % q->capacity];
        }
        PyMem_Free(q->entries);
        q->entries = entries;
        q->head = 0;
        q->capacity = capacity;
    }
    q->entries[(q->head + q->size) % q->capacity] = (SeenQueued){expires_at, (SeenWindow *)Py_NewRef(w), stamp, mid};
    q->size++;
    t->queued++;
    return 0;
}

static SeenSlot *
seen_queued_slot(SeenQueued *e)
{
    return seen_window_find(e->window, e->mid, e->stamp);
}

/* The entry a queue's front names goes if it is still there (expiry, the cap). 0 or -1 */
static int
seen_pop_front_entry(SeenTableObject *t, SeenQueue *q)
{
    SeenQueued *front = seen_queue_front(q);
    SeenWindow *w = (SeenWindow *)Py_NewRef(front->window);
    SeenSlot *slot = seen_queued_slot(front);
    seen_queue_pop(t, q);
    int rc = slot == NULL ? 0 : seen_forget(t, w, slot);
    Py_DECREF(w);
    return rc;
}

/* At the cap: the entry that expires first goes (ExpiringMap._drop_first). 0 or -1 */
static int
seen_drop_first(SeenTableObject *t)
{
    SeenQueue *first = NULL;
    for (Py_ssize_t i = 0; i < t->nqueues; i++) {
        SeenQueue *q = &t->queues[i];
        while (q->size > 0 && seen_queued_slot(seen_queue_front(q)) == NULL) {
            seen_queue_pop(t, q);
        }
        if (q->size > 0 && (first == NULL || seen_queue_front(q)->expires_at < seen_queue_front(first)->expires_at)) {
            first = q;
        }
    }
    return first == NULL ? 0 : seen_pop_front_entry(t, first);
}

/* Stale entries outnumber the live ones: every queue keeps only the entries of live slots */
static void
seen_compact(SeenTableObject *t)
{
    for (Py_ssize_t i = 0; i < t->nqueues; i++) {
        SeenQueue *q = &t->queues[i];
        Py_ssize_t kept = 0, size = q->size;
        for (Py_ssize_t j = 0; j < size; j++) {
            SeenQueued e = q->entries[(q->head + j) % q->capacity];
            if (seen_queued_slot(&e) != NULL) {
                q->entries[(q->head + kept) % q->capacity] = e;
                kept++;
            }
            else {
                t->queued--;
                Py_DECREF(e.window); /* a window out of the dict may go here: it holds no values */
            }
        }
        q->size = kept;
    }
}

/* ---- the table's operations (also what the CoAP lane calls) ---- */

int
seen_table_check(PyObject *obj)
{
    return Py_IS_TYPE(obj, &SeenTableType);
}

static SeenWindow *
seen_window_of(SeenTableObject *t, PyObject *peer)
{
    return (SeenWindow *)PyDict_GetItemWithError(t->peers, peer); /* borrowed */
}

/* The live value of (peer, mid), borrowed; NULL when there is none (an error set if the lookup failed) */
PyObject *
seen_table_lookup(PyObject *table, PyObject *peer, unsigned int mid)
{
    SeenWindow *w = seen_window_of((SeenTableObject *)table, peer);
    SeenSlot *slot = w == NULL ? NULL : seen_window_find(w, mid, 0);
    return slot == NULL ? NULL : slot->value;
}

/* Swap the value of (peer, mid) for ``new`` if it still holds ``old`` (keeps its expiry). 0 or -1 */
int
seen_table_replace(PyObject *table, PyObject *peer, unsigned int mid, PyObject *old, PyObject *new)
{
    SeenWindow *w = seen_window_of((SeenTableObject *)table, peer);
    SeenSlot *slot = w == NULL ? NULL : seen_window_find(w, mid, 0);
    if (slot != NULL && slot->value == old) {
        slot->value = Py_NewRef(new);
        Py_DECREF(old);
    }
    return PyErr_Occurred() ? -1 : 0;
}

/* Insert (or overwrite) (peer, mid) -> value for ``lifetime`` seconds from ``now``. 0 or -1 */
int
seen_table_put(PyObject *table, PyObject *peer, unsigned int mid, PyObject *value, double now, double lifetime)
{
    SeenTableObject *t = (SeenTableObject *)table;
    SeenWindow *w = (SeenWindow *)Py_XNewRef(seen_window_of(t, peer));
    if (w == NULL && PyErr_Occurred()) {
        return -1;
    }
    int rc = -1;
    SeenSlot *old = w == NULL ? NULL : seen_window_find(w, mid, 0);
    if (old != NULL) { /* overwritten: the old slot is gone, its queue entry stale */
        if (seen_forget(t, w, old) < 0) {
            goto done;
        }
    }
    else if (t->live >= t->cap && seen_drop_first(t) < 0) {
        goto done;
    }
    if (w != NULL && w->size == 0) { /* emptied just now (and out of the dict): a fresh one takes its place */
        Py_CLEAR(w);
    }
    if (w == NULL) {
        w = seen_window_new(peer);
        if (w == NULL || PyDict_SetItem(t->peers, peer, (PyObject *)w) < 0) {
            goto done;
        }
    }
    if (w->size == t->window) { /* the peer's oldest goes, live or not, then the gone ones behind it */
        SeenSlot *oldest = &w->slots[w->head];
        PyObject *gone = oldest->value;
        oldest->value = NULL;
        w->head = (w->head + 1) % w->capacity;
        w->size--;
        if (gone != NULL) {
            w->live--;
            t->live--;
        }
        while (w->size > 0 && w->slots[w->head].value == NULL) {
            w->head = (w->head + 1) % w->capacity;
            w->size--;
        }
        Py_XDECREF(gone);
    }
    if (w->size == w->capacity) { /* grow the ring (doubling, up to the window) */
        Py_ssize_t capacity = w->capacity ? 2 * w->capacity : 4;
        capacity = capacity > t->window ? t->window : capacity;
        SeenSlot *slots = PyMem_Calloc((size_t)capacity, sizeof(SeenSlot)); /* values NULL: empty */
        uint16_t *mids = slots == NULL ? NULL : PyMem_Calloc((size_t)capacity, sizeof(uint16_t));
        if (mids == NULL) {
            PyMem_Free(slots);
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t i = 0; i < w->size; i++) {
            slots[i] = w->slots[(w->head + i) % w->capacity];
            mids[i] = w->mids[(w->head + i) % w->capacity];
        }
        PyMem_Free(w->slots);
        PyMem_Free(w->mids);
        w->slots = slots;
        w->mids = mids;
        w->head = 0;
        w->capacity = capacity;
    }
    SeenQueue *q = seen_queue_for(t, lifetime);
    uint64_t stamp = ++t->stamp;
    double expires_at = now + lifetime;
    if (q == NULL || seen_queue_push(t, q, expires_at, w, stamp, mid) < 0) {
        goto done;
    }
    Py_ssize_t at = (w->head + w->size) % w->capacity;
    w->slots[at] = (SeenSlot){expires_at, Py_NewRef(value), stamp};
    w->mids[at] = (uint16_t)mid;
    w->size++;
    w->live++;
    t->live++;
    while (q->size > 0 && seen_queued_slot(seen_queue_front(q)) == NULL) { /* a stale front goes now */
        seen_queue_pop(t, q);
    }
    if (t->queued > 2 * t->live + t->cap / 8) {
        seen_compact(t);
    }
    rc = 0;
done:
    Py_XDECREF(w);
    return rc;
}

/* ---- the Python face: get, put, replace, pop, expire, len (PeerWindowedMap's) ---- */

static int
seen_key(PyObject *key, PyObject **peer, unsigned int *mid)
{
    if (!PyTuple_Check(key) || PyTuple_GET_SIZE(key) != 2 || !PyLong_Check(PyTuple_GET_ITEM(key, 1))) {
        PyErr_SetString(PyExc_TypeError, "SeenTable: keys are (peer, message id) pairs");
        return -1;
    }
    long number = PyLong_AsLong(PyTuple_GET_ITEM(key, 1));
    if (number < 0 || number > 0xFFFF) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "SeenTable: a message id is 16 bits");
        }
        return -1;
    }
    *peer = PyTuple_GET_ITEM(key, 0);
    *mid = (unsigned int)number;
    return 0;
}

static PyObject *
seen_get(SeenTableObject *t, PyObject *key)
{
    PyObject *peer;
    unsigned int mid;
    if (seen_key(key, &peer, &mid) < 0) {
        return NULL;
    }
    PyObject *value = seen_table_lookup((PyObject *)t, peer, mid);
    return value != NULL ? Py_NewRef(value) : PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
}

static PyObject *
seen_put(SeenTableObject *t, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *peer;
    unsigned int mid;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "put(key, value, now, lifetime)");
        return NULL;
    }
    double now = PyFloat_AsDouble(args[2]);
    double lifetime = now == -1.0 && PyErr_Occurred() ? -1.0 : PyFloat_AsDouble(args[3]);
    if ((lifetime == -1.0 && PyErr_Occurred()) || seen_key(args[0], &peer, &mid) < 0 ||
        seen_table_put((PyObject *)t, peer, mid, args[1], now, lifetime) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
seen_replace(SeenTableObject *t, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *peer;
    unsigned int mid;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "replace(key, old, new)");
        return NULL;
    }
    if (seen_key(args[0], &peer, &mid) < 0 || seen_table_replace((PyObject *)t, peer, mid, args[1], args[2]) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
seen_pop(SeenTableObject *t, PyObject *key)
{
    PyObject *peer;
    unsigned int mid;
    if (seen_key(key, &peer, &mid) < 0) {
        return NULL;
    }
    SeenWindow *w = (SeenWindow *)Py_XNewRef(seen_window_of(t, peer));
    SeenSlot *slot = w == NULL ? NULL : seen_window_find(w, mid, 0);
    PyObject *value = slot == NULL ? NULL : Py_NewRef(slot->value);
    int rc = slot == NULL ? (PyErr_Occurred() ? -1 : 0) : seen_forget(t, w, slot);
    Py_XDECREF(w);
    if (rc < 0) {
        Py_XDECREF(value);
        return NULL;
    }
    return value != NULL ? value : Py_NewRef(Py_None);
}

static PyObject *
seen_expire(SeenTableObject *t, PyObject *now_obj)
{
    double now = PyFloat_AsDouble(now_obj);
    if (now == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < t->nqueues; i++) {
        /* re-read each time: a value freed here may run code that puts a new lifetime (the array moves) */
        while (t->queues[i].size > 0 && seen_queue_front(&t->queues[i])->expires_at <= now) {
            if (seen_pop_front_entry(t, &t->queues[i]) < 0) {
                return NULL;
            }
        }
    }
    Py_RETURN_NONE;
}

static Py_ssize_t
seen_len(SeenTableObject *t)
{
    return t->live;
}

static int
seen_traverse(SeenTableObject *t, visitproc visit, void *arg)
{
    Py_VISIT(t->peers);
    if (t->peers == NULL) {
        return 0;
    }
    Py_ssize_t pos = 0;
    PyObject *peer, *window;
    while (PyDict_Next(t->peers, &pos, &peer, &window)) { /* the windows are not tracked: their values are ours */
        SeenWindow *w = (SeenWindow *)window;
        for (Py_ssize_t i = 0; i < w->size; i++) {
            Py_VISIT(w->slots[(w->head + i) % w->capacity].value);
        }
    }
    return 0;
}

static int
seen_clear(SeenTableObject *t)
{
    for (Py_ssize_t i = 0; i < t->nqueues; i++) {
        while (t->queues[i].size > 0) {
            seen_queue_pop(t, &t->queues[i]);
        }
        PyMem_Free(t->queues[i].entries);
        t->queues[i].entries = NULL;
        t->queues[i].capacity = 0;
    }
    t->live = 0;
    Py_CLEAR(t->peers);
    return 0;
}

static void
seen_dealloc(SeenTableObject *t)
{
    PyObject_GC_UnTrack(t);
    seen_clear(t);
    PyMem_Free(t->queues);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyObject *
seen_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"cap", "window", NULL};
    Py_ssize_t cap, window;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "nn:SeenTable", kwlist, &cap, &window)) {
        return NULL;
    }
    if (cap < 1 || window < 1) {
        PyErr_SetString(PyExc_ValueError, "SeenTable: cap and window are at least 1");
        return NULL;
    }
    SeenTableObject *t = (SeenTableObject *)type->tp_alloc(type, 0);
    if (t == NULL) {
        return NULL;
    }
    t->peers = PyDict_New();
    if (t->peers == NULL) {
        Py_DECREF(t);
        return NULL;
    }
    t->cap = cap;
    t->window = window;
    t->live = t->queued = t->nqueues = 0;
    t->stamp = 0;
    t->queues = NULL;
    return (PyObject *)t;
}

static PyObject *
seen_stats(SeenTableObject *t, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("{snsnsn}", "peers", t->peers == NULL ? 0 : PyDict_GET_SIZE(t->peers), "queued", t->queued,
                         "live", t->live);
}

/* entries(): ((peer, mid), expires_at, value) of every live entry, peer by peer, each window oldest first */
static PyObject *
seen_entries(SeenTableObject *t, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New(0);
    Py_ssize_t pos = 0;
    PyObject *peer, *window;
    while (out != NULL && t->peers != NULL && PyDict_Next(t->peers, &pos, &peer, &window)) {
        SeenWindow *w = (SeenWindow *)window;
        for (Py_ssize_t i = 0; out != NULL && i < w->size; i++) {
            Py_ssize_t at = (w->head + i) % w->capacity;
            SeenSlot *slot = &w->slots[at];
            PyObject *item = slot->value == NULL ? NULL
                                                 : Py_BuildValue("((OI)dO)", peer, (unsigned int)w->mids[at],
                                                                 slot->expires_at, slot->value);
            if (slot->value != NULL && (item == NULL || PyList_Append(out, item) < 0)) {
                Py_CLEAR(out);
            }
            Py_XDECREF(item);
        }
    }
    return out;
}

static PyMethodDef seen_methods[] = {
    {"get", (PyCFunction)seen_get, METH_O, "get(key): the value, or None"},
    {"put", (PyCFunction)(void (*)(void))seen_put, METH_FASTCALL, "put(key, value, now, lifetime)"},
    {"replace", (PyCFunction)(void (*)(void))seen_replace, METH_FASTCALL, "replace(key, old, new)"},
    {"pop", (PyCFunction)seen_pop, METH_O, "pop(key): the value removed, or None"},
    {"expire", (PyCFunction)seen_expire, METH_O, "expire(now): entries expired by now go"},
    {"stats", (PyCFunction)seen_stats, METH_NOARGS, "peers with a window, queue entries (stale ones too), live"},
    {"entries", (PyCFunction)seen_entries, METH_NOARGS, "((peer, mid), expires_at, value) of the live entries"},
    {NULL},
};

static PyMemberDef seen_members[] = {
    {"cap", T_PYSSIZET, offsetof(SeenTableObject, cap), READONLY, "entries at most"},
    {"window", T_PYSSIZET, offsetof(SeenTableObject, window), READONLY, "entries per peer at most"},
    {NULL},
};

static PySequenceMethods seen_as_sequence = {.sq_length = (lenfunc)seen_len};

static PyTypeObject SeenTableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tb_gateway._speedups.SeenTable",
    .tp_basicsize = sizeof(SeenTableObject),
    .tp_dealloc = (destructor)seen_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "SeenTable(cap, window): coap/expiring.py's PeerWindowedMap for (peer, message id) keys, in C.",
    .tp_traverse = (traverseproc)seen_traverse,
    .tp_clear = (inquiry)seen_clear,
    .tp_methods = seen_methods,
    .tp_members = seen_members,
    .tp_as_sequence = &seen_as_sequence,
    .tp_new = seen_new,
};

int
seen_init(PyObject *module)
{
    if (PyType_Ready(&SeenWindowType) < 0 || PyType_Ready(&SeenTableType) < 0) {
        return -1;
    }
    return PyModule_AddType(module, &SeenTableType);
}
