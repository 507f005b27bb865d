/* Whole per-message paths in C, for the common case only (built with _speedups.c into one module): Ingest
 * (DeviceApi.post), the HTTP fast lane (FastConnection, HttpLane), the CoAP lane (CoapLane, CoapAnswer) and
 * run_settled (pipeline.py's waiters).
 *
 * Ingest: device_api.DeviceApi.post for a telemetry message that parses with orjson into one group, with no
 * rate limit configured: count it, mark the device active, build its Record and admit it to the pipeline,
 * in one call instead of some ten Python frames (about 2 µs of a message's 7-10). Anything else — other
 * kinds, payloads normalize.py must look at again, several groups, a pipeline that is closing, full or not
 * yet running — is handed, untouched, to the Python code it stands in for (DeviceApi._post, or
 * DeviceApi._admit once the record is built), which stays the reference: tests/test_lanes.py checks that
 * both give the same records, counters, device state and answers.
 */
#include "_speedups.h"

#include <stddef.h>
#include <structmember.h>
#include <time.h>

static PyObject *limiter_name, *downlink_name, *states_name, *id_name, *active_name, *last_activity_name,
    *activity_name, *value_name, *pipeline_name, *closing_name, *queue_name, *tickets_name, *max_queue_name,
    *event_loop_name, *deliver_then_name, *kick_due_name, *kick_name, *append_name, *pending_name,
    *wakeup_name, *event_value_name, *set_name,
    *outcome_name, *then_name, *activity_seen_name, *now_ms_name, *loop_key, *empty_args;
static PyObject *one;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *api;         /* DeviceApi: its limiter, downlink and pipeline are read at every call */
    PyObject *fallback;    /* DeviceApi._post(device, kind, payload, transport, now_ms=None, *, activity_seen) */
    PyObject *admit;       /* DeviceApi._admit(device, kind, records, transport) */
    PyObject *received;    /* {Transport: counter child} */
    PyObject *clock;       /* () -> epoch ms */
    PyObject *make_record; /* Record(device, kind, ts, values, transport, received_at) */
    PyObject *telemetry;   /* RecordKind.TELEMETRY */
    PyObject *loads;       /* orjson.loads */
    PyObject *ticket_type; /* pipeline.Ticket */
    PyObject *delivered;   /* Outcome.DELIVERED */
    PyObject *loop_kwargs; /* {"loop": the pipeline's loop}: Ticket(loop=loop) without a dict per call */
    int type_cast;
    Py_ssize_t max_string;
} IngestObject;

/* obj.name is what (1), anything else (0), or an error (-1); through the call site's attribute cache */
#define ATTR_IS(obj, name, what)                                                                              \
    __extension__({                                                                                            \
        PyObject *value_ = GETATTR((obj), (name));                                                             \
        int is_ = value_ == NULL ? -1 : value_ == (what);                                                      \
        Py_XDECREF(value_);                                                                                    \
        is_;                                                                                                   \
    })
#define attr_is_true(obj, name) ATTR_IS(obj, name, Py_True)
#define attr_is_none(obj, name) ATTR_IS(obj, name, Py_None)

/* counter.value += 1 (fastmetrics' CounterChild.inc() without its frame) */
static int
count_one(PyObject *counter)
{
    PyObject *value = GETATTR(counter, value_name);
    PyObject *sum = value == NULL ? NULL : PyNumber_Add(value, one);
    int rc = sum == NULL ? -1 : SETATTR(counter, value_name, sum);
    Py_XDECREF(value);
    Py_XDECREF(sum);
    return rc;
}

/* downlink.hub.Downlink.activity(device, transport, now): its hot path (an active device: last_activity = now)
 * here, the rest by calling it */
int
mark_active(PyObject *downlink, PyObject *device, PyObject *transport, PyObject *now)
{
    PyObject *states = GETATTR(downlink, states_name);
    if (states == NULL) {
        return -1;
    }
    int done = 0;
    if (PyDict_CheckExact(states)) {
        PyObject *id = GETATTR(device, id_name);
        PyObject *known = id == NULL ? NULL : PyDict_GetItemWithError(states, id); /* borrowed */
        Py_XDECREF(id);
        if (known != NULL) {
            Py_INCREF(known);
            int active = attr_is_true(known, active_name);
            done = active < 0 ? -1 : active && SETATTR(known, last_activity_name, now) < 0 ? -1 : active;
            Py_DECREF(known);
        }
        else if (PyErr_Occurred()) {
            done = -1;
        }
    }
    Py_DECREF(states);
    if (done) {
        return done < 0 ? -1 : 0;
    }
    PyObject *args[] = {downlink, device, transport, now};
    PyObject *none = PyObject_VectorcallMethod(activity_name, args, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_XDECREF(none);
    return none == NULL ? -1 : 0;
}

/* pipeline.Pipeline.submit([record]) when the pipeline is running (a callback or a plain sink) with room: the ticket;
 * NULL without an error in any other state (the caller asks DeviceApi._admit) */
static PyObject *
submit_one(IngestObject *self, PyObject *pipeline, PyObject *record)
{
    PyObject *queue = NULL, *tickets = NULL, *loop = NULL, *ticket = NULL, *none = NULL;
    int closing = attr_is_true(pipeline, closing_name);
    if (closing != 0) {
        return NULL;
    }
    int plain = attr_is_none(pipeline, deliver_then_name); /* a plain sink (Kafka): wake its batching task */
    if (plain < 0) {
        return NULL;
    }
    PyObject *limit = GETATTR(pipeline, max_queue_name);
    Py_ssize_t max_queue = limit == NULL ? -1 : PyLong_AsSsize_t(limit);
    Py_XDECREF(limit);
    queue = GETATTR(pipeline, queue_name);
    tickets = queue == NULL ? NULL : GETATTR(pipeline, tickets_name);
    loop = tickets == NULL ? NULL : GETATTR(pipeline, event_loop_name);
    if (loop == NULL || PyErr_Occurred() || loop == Py_None) {
        goto done;
    }
    Py_ssize_t depth = PyObject_Length(queue);
    if (depth < 0 || depth + 1 > max_queue) {
        goto done;
    }
    /* Ticket(loop=loop) as type_call makes it (tp_new, then tp_init), with one kwargs dict kept for it */
    PyTypeObject *ticket_type = (PyTypeObject *)self->ticket_type;
    PyObject *kept = PyDict_GetItemWithError(self->loop_kwargs, loop_key); /* borrowed */
    if ((kept != loop && (PyErr_Occurred() || PyDict_SetItem(self->loop_kwargs, loop_key, loop) < 0)) ||
        (ticket = ticket_type->tp_new(ticket_type, empty_args, NULL)) == NULL) {
        goto done;
    }
    if (ticket_type->tp_init(ticket, empty_args, self->loop_kwargs) < 0 || SETATTR(ticket, pending_name, one) < 0 ||
        SETATTR(ticket, outcome_name, self->delivered) < 0 || SETATTR(ticket, then_name, Py_None) < 0) {
        Py_CLEAR(ticket);
        goto done;
    }
    none = CALL1(queue, append_name, record);
    if (none == NULL) {
        Py_CLEAR(ticket);
        goto done;
    }
    Py_DECREF(none);
    none = CALL1(tickets, append_name, ticket);
    if (none == NULL) { /* the record is queued without its ticket: as broken as Python's submit would be */
        Py_CLEAR(ticket);
        goto done;
    }
    Py_DECREF(none);
    if (plain) { /* self._wakeup.set(), skipped while it is set (the task has not run since) */
        PyObject *wakeup = GETATTR(pipeline, wakeup_name);
        int set = wakeup == NULL ? -1 : attr_is_true(wakeup, event_value_name);
        none = set != 0 ? NULL : CALL0(wakeup, set_name);
        if (set < 0 || (set == 0 && none == NULL)) {
            Py_CLEAR(ticket);
        }
        Py_XDECREF(wakeup);
        Py_XDECREF(none);
        goto done;
    }
    int due = attr_is_true(pipeline, kick_due_name); /* _kick_next_pass: once per loop pass */
    none = due != 0 ? NULL : PyObject_CallMethodNoArgs(pipeline, kick_name);
    if (due < 0 || (due == 0 && none == NULL)) {
        Py_CLEAR(ticket);
    }
    Py_XDECREF(none);
done:
    Py_XDECREF(queue);
    Py_XDECREF(tickets);
    Py_XDECREF(loop);
    return ticket;
}

/* The common telemetry message, or NULL without an error (nothing done yet): ask DeviceApi._post. */
static PyObject *
ingest_fast(IngestObject *self, PyObject *device, PyObject *kind, PyObject *payload, PyObject *transport,
            PyObject *now_arg, int activity_seen)
{
    if (kind != self->telemetry || !PyBytes_CheckExact(payload) ||
        has_long_fraction(PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))) {
        return NULL;
    }
    PyObject *counter = PyDict_GetItemWithError(self->received, transport); /* borrowed */
    if (counter == NULL || attr_is_none(self->api, limiter_name) != 1) {
        return NULL; /* an unknown transport or an error: Python raises it; a rate limit: Python checks it */
    }
    PyObject *now = now_arg == Py_None ? PyObject_CallNoArgs(self->clock) : Py_NewRef(now_arg);
    if (now == NULL) {
        return NULL;
    }
    PyObject *document = PyObject_CallOneArg(self->loads, payload);
    if (document == NULL) {
        PyErr_Clear(); /* normalize.py says what is wrong, counted and logged */
        Py_DECREF(now);
        return NULL;
    }
    PyObject *groups = telemetry_groups(document, now, self->type_cast, self->max_string);
    Py_DECREF(document);
    if (groups == NULL || PyList_GET_SIZE(groups) != 1) { /* none, several (merged per ts), or normalize.py's */
        Py_XDECREF(groups);
        Py_DECREF(now);
        return NULL;
    }
    /* from here on the message is taken: what DeviceApi._post does, in its order */
    PyObject *record = NULL, *ticket = NULL, *pipeline = NULL, *downlink = NULL;
    if (count_one(counter) < 0) {
        goto done;
    }
    if (!activity_seen) {
        downlink = GETATTR(self->api, downlink_name);
        if (downlink == NULL || (downlink != Py_None && mark_active(downlink, device, transport, now) < 0)) {
            goto done;
        }
    }
    PyObject *group = PyList_GET_ITEM(groups, 0);
    PyObject *args[] = {device, kind, PyTuple_GET_ITEM(group, 0), PyTuple_GET_ITEM(group, 1), transport, now};
    record = PyObject_Vectorcall(self->make_record, args, 6, NULL);
    pipeline = record == NULL ? NULL : GETATTR(self->api, pipeline_name);
    if (pipeline == NULL) {
        goto done;
    }
    ticket = submit_one(self, pipeline, record);
    if (ticket == NULL && !PyErr_Occurred()) {
        PyObject *records = PyList_New(1);
        if (records != NULL) {
            PyList_SET_ITEM(records, 0, Py_NewRef(record));
            PyObject *admit_args[] = {device, kind, records, transport};
            ticket = PyObject_Vectorcall(self->admit, admit_args, 4, NULL);
            Py_DECREF(records);
        }
    }
done:
    Py_XDECREF(record);
    Py_XDECREF(pipeline);
    Py_XDECREF(downlink);
    Py_DECREF(groups);
    Py_DECREF(now);
    if (ticket == NULL && !PyErr_Occurred()) {
        PyErr_SetString(PyExc_SystemError, "Ingest: no answer");
    }
    return ticket;
}

/* Ingest(device, kind, payload, transport, now_ms=None, *, activity_seen=False): DeviceApi.post's signature */
static PyObject *
ingest_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    IngestObject *self = (IngestObject *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *now = nargs == 5 ? args[4] : Py_None;
    int activity_seen = 0, usable = nargs == 4 || nargs == 5;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t i = 0; usable && i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i), *value = args[nargs + i];
        if (name == activity_seen_name || PyUnicode_Compare(name, activity_seen_name) == 0) {
            activity_seen = value == Py_True ? 1 : value == Py_False ? 0 : -1;
            usable = activity_seen >= 0;
        }
        else if (nargs == 4 && (name == now_ms_name || PyUnicode_Compare(name, now_ms_name) == 0)) {
            now = value;
        }
        else {
            usable = 0;
        }
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (usable) {
        PyObject *result = ingest_fast(self, args[0], args[1], args[2], args[3], now, activity_seen);
        if (result != NULL || PyErr_Occurred()) {
            return result;
        }
    }
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

static int
ingest_traverse(IngestObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->api);
    Py_VISIT(self->fallback);
    Py_VISIT(self->admit);
    Py_VISIT(self->received);
    Py_VISIT(self->clock);
    Py_VISIT(self->make_record);
    Py_VISIT(self->telemetry);
    Py_VISIT(self->loads);
    Py_VISIT(self->ticket_type);
    Py_VISIT(self->delivered);
    Py_VISIT(self->loop_kwargs);
    return 0;
}

static int
ingest_clear(IngestObject *self)
{
    Py_CLEAR(self->api);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->admit);
    Py_CLEAR(self->received);
    Py_CLEAR(self->clock);
    Py_CLEAR(self->make_record);
    Py_CLEAR(self->telemetry);
    Py_CLEAR(self->loads);
    Py_CLEAR(self->ticket_type);
    Py_CLEAR(self->delivered);
    Py_CLEAR(self->loop_kwargs);
    return 0;
}

static void
ingest_dealloc(IngestObject *self)
{
    PyObject_GC_UnTrack(self);
    ingest_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
ingest_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    IngestObject *self = (IngestObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    int type_cast = 0;
    if (!PyArg_ParseTuple(args, "OOOO!OOOOOOpn:Ingest", &self->api, &self->fallback, &self->admit, &PyDict_Type,
                          &self->received, &self->clock, &self->make_record, &self->telemetry, &self->loads,
                          &self->ticket_type, &self->delivered, &type_cast, &self->max_string) ||
        (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)) {
        self->api = self->fallback = self->admit = self->received = self->clock = self->make_record = NULL;
        self->telemetry = self->loads = self->ticket_type = self->delivered = NULL;
        Py_DECREF(self);
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "Ingest takes positional arguments only");
        }
        return NULL;
    }
    Py_INCREF(self->api);
    Py_INCREF(self->fallback);
    Py_INCREF(self->admit);
    Py_INCREF(self->received);
    Py_INCREF(self->clock);
    Py_INCREF(self->make_record);
    Py_INCREF(self->telemetry);
    Py_INCREF(self->loads);
    Py_INCREF(self->ticket_type);
    Py_INCREF(self->delivered);
    if (!PyType_Check(self->ticket_type)) {
        PyErr_SetString(PyExc_TypeError, "Ingest: the ticket type must be a type");
        Py_DECREF(self);
        return NULL;
    }
    self->loop_kwargs = PyDict_New();
    if (self->loop_kwargs == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->type_cast = type_cast;
    self->vectorcall = ingest_vectorcall;
    return (PyObject *)self;
}

static PyTypeObject IngestType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tb_gateway._speedups.Ingest",
    .tp_basicsize = sizeof(IngestObject),
    .tp_dealloc = (destructor)ingest_dealloc,
    .tp_vectorcall_offset = offsetof(IngestObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)ingest_traverse,
    .tp_clear = (inquiry)ingest_clear,
    .tp_new = ingest_new,
    .tp_doc = "DeviceApi.post for the common telemetry message (device_api.py); the rest goes to its fallback",
};

/* ------------------------------------------------------------------------------------------------------------
 * Both lanes ask the auth cache (DeviceApi.known_device, which is AuthService.cached_identity) once per
 * request. When it is that method, with no address blocklist and the monotonic clock, the lookup is done
 * here, with the credentials' hash kept in the lane's route cache: the credentials are a frozen dataclass,
 * whose __hash__ (and __eq__, for another object with the same token) are Python frames.
 */

static PyObject *monotonic_fn; /* time.monotonic: the auth cache's clock, read here as CLOCK_MONOTONIC */
static PyObject *blocklist_name, *clock_name, *cache_name, *identity_name, *expires_at_name;
static PyObject *known_device_name; /* (also the HTTP lane's) */

static double monotonic_s(void);

static PyObject *bounds_name, *buckets_name, *count_name, *sum_name;
static PyObject *observe_name; /* (also the HTTP lane's) */
static PyObject *one;

/* child.observe(value) for the ack latency: fastmetrics.HistogramChild.observe in C (its bucket by
 * bisect_left over _bounds, count and sum), any other histogram child by calling it */
int
observe_seconds(PyObject *child, double value)
{
    PyObject *bounds = NULL, *buckets = NULL, *count = NULL, *sum = NULL, *fresh = NULL;
    int rc = -1;
    bounds = GETATTR(child, bounds_name);
    buckets = bounds == NULL ? NULL : GETATTR(child, buckets_name);
    if (buckets == NULL) { /* not fastmetrics' HistogramChild: its observe() below */
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
            goto done;
        }
        PyErr_Clear();
    }
    if (bounds == NULL || buckets == NULL || !PyList_CheckExact(bounds) || !PyList_CheckExact(buckets) ||
        PyList_GET_SIZE(buckets) != PyList_GET_SIZE(bounds) + 1) {
        PyObject *seconds = PyFloat_FromDouble(value);
        PyObject *none = seconds == NULL ? NULL : PyObject_CallMethodOneArg(child, observe_name, seconds);
        rc = none == NULL ? -1 : 0;
        Py_XDECREF(seconds);
        Py_XDECREF(none);
        goto done;
    }
    Py_ssize_t lo = 0, hi = PyList_GET_SIZE(bounds);
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        double bound = PyFloat_AsDouble(PyList_GET_ITEM(bounds, mid));
        if (bound == -1.0 && PyErr_Occurred()) {
            goto done;
        }
        if (bound < value) {
            lo = mid + 1;
        }
        else {
            hi = mid;
        }
    }
    fresh = PyNumber_Add(PyList_GET_ITEM(buckets, lo), one);
    if (fresh == NULL) {
        goto done;
    }
    PyList_SetItem(buckets, lo, fresh); /* steals it */
    count = GETATTR(child, count_name);
    PyObject *counted = count == NULL ? NULL : PyNumber_Add(count, one);
    int failed = counted == NULL || SETATTR(child, count_name, counted) < 0;
    Py_XDECREF(counted);
    sum = failed ? NULL : GETATTR(child, sum_name);
    double total = sum == NULL ? 0.0 : PyFloat_AsDouble(sum);
    PyObject *summed = sum == NULL || PyErr_Occurred() ? NULL : PyFloat_FromDouble(total + value);
    rc = summed == NULL || SETATTR(child, sum_name, summed) < 0 ? -1 : 0;
    Py_XDECREF(summed);
done:
    Py_XDECREF(bounds);
    Py_XDECREF(buckets);
    Py_XDECREF(count);
    Py_XDECREF(sum);
    return rc;
}

/* (credentials, kind, hash): a route cache's entry; the hash is None without credentials */
static PyObject *
route_entry(PyObject *credentials, PyObject *kind)
{
    if (credentials == Py_None) {
        return PyTuple_Pack(3, credentials, kind, Py_None);
    }
    Py_hash_t hash = PyObject_Hash(credentials);
    PyObject *number = hash == -1 ? NULL : PyLong_FromSsize_t(hash);
    PyObject *entry = number == NULL ? NULL : PyTuple_Pack(3, credentials, kind, number);
    Py_XDECREF(number);
    return entry;
}

/* api.known_device(credentials, transport, address): the device, or None; now: monotonic_s(), read by the caller */
static PyObject *
lookup_device(PyObject *api, PyObject *usual, PyObject *credentials, PyObject *hash, PyObject *transport,
              PyObject *address, double now)
{
    PyObject *known = GETATTR(api, known_device_name);
    if (known == NULL) {
        return NULL;
    }
    PyObject *auth = known == usual && PyMethod_Check(known) ? PyMethod_GET_SELF(known) : NULL;
    PyObject *blocklist = auth == NULL ? NULL : GETATTR(auth, blocklist_name);
    PyObject *clock = blocklist == NULL ? NULL : GETATTR(auth, clock_name);
    PyObject *cache = clock == NULL ? NULL : GETATTR(auth, cache_name);
    PyObject *result = NULL;
    if (PyErr_Occurred()) {
        goto done;
    }
    if (cache != NULL && blocklist == Py_None && clock == monotonic_fn && PyDict_Check(cache) && PyLong_Check(hash)) {
        Py_hash_t value = PyLong_AsSsize_t(hash);
        PyObject *entry = value == -1 && PyErr_Occurred() ? NULL : _PyDict_GetItem_KnownHash(cache, credentials, value);
        if (entry == NULL) {
            result = PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
            goto done;
        }
        Py_INCREF(entry);
        PyObject *identity = GETATTR(entry, identity_name);
        PyObject *expires = identity == NULL ? NULL : GETATTR(entry, expires_at_name);
        double at = expires == NULL ? 0.0 : PyFloat_AsDouble(expires);
        Py_DECREF(entry);
        Py_XDECREF(expires);
        if (expires == NULL || PyErr_Occurred()) {
            Py_XDECREF(identity);
            goto done;
        }
        if (identity == Py_None || at <= now) {
            Py_DECREF(identity);
            result = Py_NewRef(Py_None);
        }
        else {
            result = identity;
        }
        goto done;
    }
    PyObject *args[] = {credentials, transport, address};
    result = PyObject_Vectorcall(known, args, 3, NULL);
done:
    Py_DECREF(known);
    Py_XDECREF(blocklist);
    Py_XDECREF(clock);
    Py_XDECREF(cache);
    return result;
}

/* ------------------------------------------------------------------------------------------------------------
 * The HTTP fast lane (http/connection.py, module docstring). FastConnection is the C base of HttpConnection:
 * its data_received takes a read that is exactly one simple POST of a device message from a device the auth
 * cache knows, on a connection with nothing else in progress, posts it, and _fast_settled writes the 200
 * once the pipeline settled it. Everything else goes to HttpConnection's Python methods (_read,
 * _fast_failed, _fast_answered, _fast_resume), the general path. The connection state read on every request
 * lives in this struct (member descriptors), so the Python code reads and writes it as plain attributes.
 */

enum { NO_TIMER, FRESH, IDLE, HEAD }; /* http/connection.py: what the connection's one deadline is for */

typedef struct {
    PyObject_HEAD
    PyObject *server;      /* HttpServer: draining, max_payload, idle_timeout (read each time), route() */
    PyObject *api;         /* DeviceApi: pipeline.poll, known_device and post, read at every request */
    PyObject *routes;      /* {target: (credentials, kind)}: server.route for POST, cached */
    PyObject *http;        /* Transport.HTTP */
    PyObject *keep;        /* Persist.KEEP */
    PyObject *outcome_type;
    PyObject *delivered;   /* Outcome.DELIVERED */
    PyObject *ticket_type; /* pipeline.Ticket */
    PyObject *when_settled;
    PyObject *responses;   /* EmptyResponses: table[Persist.KEEP][200] is this second's 200 */
    PyObject *ack_latency; /* histogram child: observe(seconds) */
    PyObject *known_device; /* api.known_device when the lane was made: AuthService.cached_identity */
    Py_ssize_t max_head, max_routes;
    Py_ssize_t taken; /* requests the fast lane took (tests/test_http_fast.py tells the two paths apart by it) */
} HttpLaneObject;

typedef struct {
    PyObject_HEAD
    PyObject *lane;
    PyObject *loop;
    PyObject *transport;
    PyObject *queue;   /* deque of Request: the answers owed, in order */
    PyObject *current; /* the Request whose body is being read, or None */
    PyObject *fast;    /* the fast lane's one reusable Request */
    PyObject *address;
    PyObject *settled; /* self._fast_settled, bound once */
    PyObject *target, *route; /* the last POST target the lane read here and its route: a device posts to one */
    double deadline;
    int timer;
    char busy, paused, write_paused, stopped, closing;
} FastConnectionObject;

static PyObject *pipeline_name_, *poll_name, *known_device_name, *post_name, *draining_name, *route_name,
    *persist_name, *device_attr_name, *done_at_name, *fatal_name, *popleft_name_, *write_name, *is_closing_name,
    *time_name, *table_name, *observe_name, *cancelled_name, *result_name_, *done_name_, *read_name,
    *fast_failed_name, *fast_answered_name, *fast_resume_name, *fast_settled_name, *post_method, *status_200,
    *then_name_, *max_payload_name, *idle_timeout_name;

static double
monotonic_s(void) /* time.perf_counter() on Linux: the same CLOCK_MONOTONIC */
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

static int
is_none(PyObject *obj)
{
    return obj == NULL || obj == Py_None;
}

/* (credentials, kind) of a POST target, through the lane's cache; NULL with an error on failure */
static PyObject *
post_route(HttpLaneObject *lane, PyObject *target)
{
    PyObject *found = PyDict_GetItemWithError(lane->routes, target);
    if (found != NULL) {
        return Py_NewRef(found);
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *args[] = {lane->server, post_method, target};
    PyObject *route = PyObject_VectorcallMethod(route_name, args, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (route == NULL) {
        return NULL;
    }
    if (!PyTuple_Check(route) || PyTuple_GET_SIZE(route) != 5) {
        Py_DECREF(route);
        PyErr_SetString(PyExc_TypeError, "HttpServer.route: expected a 5-tuple");
        return NULL;
    }
    found = route_entry(PyTuple_GET_ITEM(route, 1), PyTuple_GET_ITEM(route, 4));
    Py_DECREF(route);
    if (found == NULL) {
        return NULL;
    }
    if (PyDict_GET_SIZE(lane->routes) >= lane->max_routes) {
        PyDict_Clear(lane->routes); /* a flood of made-up targets just refills it */
    }
    if (PyDict_SetItem(lane->routes, target, found) < 0) {
        Py_DECREF(found);
        return NULL;
    }
    return found;
}

/* The request is queued and posted; hand the answer on (an Outcome now, or a future to follow). 0 or -1. */
static int
follow(FastConnectionObject *self, HttpLaneObject *lane, PyObject *request, PyObject *result)
{
    PyObject *none;
    if (PyObject_TypeCheck(result, (PyTypeObject *)lane->outcome_type)) { /* answered at once */
        none = PyObject_CallMethodObjArgs((PyObject *)self, fast_answered_name, request, result, NULL);
        Py_XDECREF(none);
        return none == NULL ? -1 : 0;
    }
    self->busy = 1;
    if (Py_IS_TYPE(result, (PyTypeObject *)lane->ticket_type)) { /* pipeline.when_settled, its usual case */
        PyObject *then = GETATTR(result, then_name_);
        int free = then == Py_None;
        Py_XDECREF(then);
        if (then == NULL) {
            return -1;
        }
        PyObject *done = free ? CALL0(result, done_name_) : NULL;
        if (free && done == NULL) {
            return -1;
        }
        free = free && done == Py_False;
        Py_XDECREF(done);
        if (free) {
            return SETATTR(result, then_name_, self->settled);
        }
    }
    none = PyObject_CallFunctionObjArgs(lane->when_settled, result, self->settled, NULL);
    Py_XDECREF(none);
    return none == NULL ? -1 : 0;
}

/* 1: the fast lane took the read; 0: leave it to _read (nothing was changed); -1: an error */
static int
fast_read(FastConnectionObject *self, HttpLaneObject *lane, PyObject *data)
{
    if (is_none(self->queue) || !is_none(self->current) || self->timer == HEAD || self->write_paused ||
        is_none(self->fast) || !PyBytes_CheckExact(data)) {
        return 0;
    }
    Py_ssize_t waiting = PyObject_Length(self->queue);
    if (waiting != 0) {
        return waiting < 0 ? -1 : 0;
    }
    const char *bytes = PyBytes_AS_STRING(data);
    Py_ssize_t size = PyBytes_GET_SIZE(data), target_end, body_start;
    if (!http_post_parse(bytes, size, lane->max_head, &target_end, &body_start)) {
        return 0;
    }
    Py_ssize_t target_size = target_end - 5;
    PyObject *route;
    if (self->target != NULL && self->route != NULL && PyBytes_GET_SIZE(self->target) == target_size &&
        memcmp(PyBytes_AS_STRING(self->target), bytes + 5, (size_t)target_size) == 0) {
        route = Py_NewRef(self->route); /* a route depends on the target alone (HttpServer.route) */
    }
    else {
        PyObject *target = PyBytes_FromStringAndSize(bytes + 5, target_size);
        route = target == NULL ? NULL : post_route(lane, target);
        if (route == NULL) {
            Py_XDECREF(target);
            return -1;
        }
        Py_XSETREF(self->target, target);
        Py_XSETREF(self->route, Py_NewRef(route));
    }
    PyObject *credentials = PyTuple_GET_ITEM(route, 0), *kind = PyTuple_GET_ITEM(route, 1);
    PyObject *hash = PyTuple_GET_ITEM(route, 2);
    PyObject *device = NULL, *body = NULL, *result = NULL, *post = NULL, *none = NULL, *at = NULL;
    PyObject *request = Py_NewRef(self->fast);
    int rc = -1;
    if (credentials == Py_None || kind == Py_None) {
        rc = 0;
        goto done;
    }
    PyObject *limit = GETATTR(lane->server, max_payload_name);
    Py_ssize_t max_payload = limit == NULL ? -1 : PyLong_AsSsize_t(limit);
    Py_XDECREF(limit);
    PyObject *draining = PyErr_Occurred() ? NULL : GETATTR(lane->server, draining_name);
    if (draining == NULL) {
        goto done;
    }
    int drain = PyObject_IsTrue(draining);
    Py_DECREF(draining);
    if (drain != 0 || size - body_start > max_payload) {
        rc = drain < 0 ? -1 : 0;
        goto done;
    }
    double now = monotonic_s(); /* the auth cache's clock, and when the request was taken */
    device = lookup_device(lane->api, lane->known_device, credentials, hash, lane->http,
                           self->address != NULL ? self->address : Py_None, now);
    if (device == NULL || device == Py_None) {
        rc = device == NULL ? -1 : 0;
        goto done;
    }
    /* taken: from here on the request is the fast lane's */
    lane->taken++;
    at = PyFloat_FromDouble(now);
    if (at == NULL || SETATTR(request, persist_name, lane->keep) < 0 ||
        SETATTR(request, device_attr_name, device) < 0 || SETATTR(request, done_at_name, at) < 0) {
        goto done;
    }
    self->timer = NO_TIMER;
    self->deadline = 0.0;
    none = CALL1(self->queue, append_name, request);
    if (none == NULL) {
        goto done;
    }
    body = PyBytes_FromStringAndSize(bytes + body_start, size - body_start);
    post = body == NULL ? NULL : GETATTR(lane->api, post_name);
    if (post == NULL) {
        goto done;
    }
    PyObject *post_args[] = {device, kind, body, lane->http};
    result = PyObject_Vectorcall(post, post_args, 4, NULL);
    if (result == NULL) { /* a PayloadError (counted and logged) or a failure: HttpConnection answers it */
        if (!PyErr_ExceptionMatches(PyExc_Exception)) {
            goto done;
        }
        PyObject *type, *exc, *traceback;
        PyErr_Fetch(&type, &exc, &traceback);
        PyErr_NormalizeException(&type, &exc, &traceback);
        if (exc != NULL && traceback != NULL) {
            PyException_SetTraceback(exc, traceback);
        }
        Py_XDECREF(none);
        none = exc == NULL ? NULL : PyObject_CallMethodObjArgs((PyObject *)self, fast_failed_name, request, exc, NULL);
        Py_XDECREF(type);
        Py_XDECREF(exc);
        Py_XDECREF(traceback);
        rc = none == NULL ? -1 : 1;
        goto done;
    }
    rc = follow(self, lane, request, result) < 0 ? -1 : 1;
done:
    Py_DECREF(route);
    Py_XDECREF(device);
    Py_XDECREF(body);
    Py_XDECREF(result);
    Py_XDECREF(post);
    Py_XDECREF(none);
    Py_XDECREF(at);
    Py_DECREF(request);
    return rc;
}

static PyObject *
fast_data_received(FastConnectionObject *self, PyObject *data)
{
    HttpLaneObject *lane = (HttpLaneObject *)self->lane;
    if (is_none((PyObject *)lane)) {
        PyErr_SetString(PyExc_RuntimeError, "FastConnection: no lane");
        return NULL;
    }
    /* answers whose batch is durable go out now, not at the end of this pass */
    PyObject *pipeline = GETATTR(lane->api, pipeline_name_);
    PyObject *poll = pipeline == NULL ? NULL : GETATTR(pipeline, poll_name);
    PyObject *none = poll == NULL ? NULL : PyObject_CallNoArgs(poll);
    Py_XDECREF(pipeline);
    Py_XDECREF(poll);
    if (none == NULL) {
        return NULL;
    }
    Py_DECREF(none);
    if (self->stopped) {
        Py_RETURN_NONE; /* failing (lingering), draining or after EOF: discard */
    }
    Py_INCREF(self);
    Py_INCREF(lane);
    int taken = fast_read(self, lane, data);
    none = taken == 0 ? PyObject_CallMethodOneArg((PyObject *)self, read_name, data) : NULL;
    Py_DECREF(lane);
    Py_DECREF(self);
    if (taken < 0) {
        return NULL;
    }
    return taken ? Py_NewRef(Py_None) : none;
}

/* The fast lane's message is settled. Delivered, on a connection where nothing else happened meanwhile,
 * the 200 is written here: what _resume -> _finish -> _go_on would do then. Anything else: _fast_resume. */
static PyObject *
fast_settled(FastConnectionObject *self, PyObject *future)
{
    HttpLaneObject *lane = (HttpLaneObject *)self->lane;
    PyObject *request = self->fast, *transport = self->transport;
    PyObject *cancelled = CALL0(future, cancelled_name);
    if (cancelled == NULL) {
        return NULL;
    }
    int plain = cancelled == Py_False;
    Py_DECREF(cancelled);
    if (plain) {
        PyObject *outcome = CALL0(future, result_name_);
        if (outcome == NULL) {
            return NULL;
        }
        plain = outcome == lane->delivered;
        Py_DECREF(outcome);
    }
    plain = plain && !self->closing && !self->stopped && !self->paused && self->timer == NO_TIMER &&
            is_none(self->current) && !is_none(transport) && !is_none(request) && !is_none(self->queue);
    if (plain) {
        int fatal = -1, draining = -1, closing = -1;
        PyObject *value = GETATTR(request, fatal_name);
        if (value != NULL) {
            fatal = PyObject_IsTrue(value);
            Py_DECREF(value);
        }
        value = fatal != 0 ? NULL : GETATTR(lane->server, draining_name);
        if (value != NULL) {
            draining = PyObject_IsTrue(value);
            Py_DECREF(value);
        }
        value = draining != 0 ? NULL : CALL0(transport, is_closing_name);
        if (value != NULL) {
            closing = PyObject_IsTrue(value);
            Py_DECREF(value);
        }
        if (PyErr_Occurred()) {
            return NULL;
        }
        plain = fatal == 0 && draining == 0 && closing == 0 && PyObject_Length(self->queue) == 1;
    }
    if (!plain) {
        return PyErr_Occurred() ? NULL : PyObject_CallMethodOneArg((PyObject *)self, fast_resume_name, future);
    }
    Py_INCREF(self);
    PyObject *result = NULL, *at = NULL, *latency = NULL, *none = NULL, *table = NULL, *popped = NULL, *idle = NULL;
    self->busy = 0;
    at = GETATTR(request, done_at_name);
    double done_at = at == NULL ? -1.0 : PyFloat_AsDouble(at);
    double settled_at = monotonic_s();
    if (PyErr_Occurred() || observe_seconds(lane->ack_latency, settled_at - done_at) < 0) {
        goto done;
    }
    table = GETATTR(lane->responses, table_name);
    if (table == NULL) {
        goto done;
    }
    PyObject *answers = PyTuple_Check(table) && PyTuple_GET_SIZE(table) > 0 ? PyTuple_GET_ITEM(table, 0) : NULL;
    PyObject *ok = answers != NULL && PyDict_Check(answers) ? PyDict_GetItemWithError(answers, status_200) : NULL;
    if (ok == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "FastConnection: no 200 in the responses table");
        }
        goto done;
    }
    none = CALL1(transport, write_name, ok);
    popped = none == NULL ? NULL : CALL0(self->queue, popleft_name_);
    /* loop.time() is CLOCK_MONOTONIC too (asyncio's time.monotonic(), uvloop's uv_now(), cached and at most a
     * few ms behind): the idle deadline is counted from the clock read for the latency above */
    idle = popped == NULL ? NULL : GETATTR(lane->server, idle_timeout_name);
    double when = idle == NULL ? 0.0 : settled_at + PyFloat_AsDouble(idle);
    if (idle == NULL || PyErr_Occurred()) {
        goto done;
    }
    self->timer = IDLE;
    self->deadline = when;
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(at);
    Py_XDECREF(latency);
    Py_XDECREF(none);
    Py_XDECREF(table);
    Py_XDECREF(popped);
    Py_XDECREF(idle);
    Py_DECREF(self);
    return result;
}

static int
fast_connection_traverse(FastConnectionObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->lane);
    Py_VISIT(self->loop);
    Py_VISIT(self->transport);
    Py_VISIT(self->queue);
    Py_VISIT(self->current);
    Py_VISIT(self->fast);
    Py_VISIT(self->address);
    Py_VISIT(self->settled);
    Py_VISIT(self->target);
    Py_VISIT(self->route);
    return 0;
}

static int
fast_connection_clear(FastConnectionObject *self)
{
    Py_CLEAR(self->lane);
    Py_CLEAR(self->loop);
    Py_CLEAR(self->transport);
    Py_CLEAR(self->queue);
    Py_CLEAR(self->current);
    Py_CLEAR(self->fast);
    Py_CLEAR(self->address);
    Py_CLEAR(self->settled);
    Py_CLEAR(self->target);
    Py_CLEAR(self->route);
    return 0;
}

static void
fast_connection_dealloc(FastConnectionObject *self)
{
    PyObject_GC_UnTrack(self);
    fast_connection_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self); /* a subclass's instance: subtype_dealloc releases its type */
}

static PyObject *
fast_connection_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    FastConnectionObject *self = (FastConnectionObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->timer = FRESH;
    self->settled = PyObject_GetAttr((PyObject *)self, fast_settled_name); /* bound once: no cycle until set */
    if (self->settled == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyMethodDef fast_connection_methods[] = {
    {"data_received", (PyCFunction)fast_data_received, METH_O,
     "asyncio.Protocol.data_received: the fast lane, else HttpConnection._read"},
    {"_fast_settled", (PyCFunction)fast_settled, METH_O,
     "the fast lane's message is settled: write its 200, else HttpConnection._fast_resume"},
    {NULL, NULL, 0, NULL},
};

#define OBJ(field, doc) {#field, T_OBJECT, offsetof(FastConnectionObject, field), 0, doc}
static PyMemberDef fast_connection_members[] = {
    OBJ(lane, "the server's HttpLane"),
    OBJ(loop, NULL),
    OBJ(transport, NULL),
    OBJ(queue, "deque of Request: the answers owed, in order"),
    OBJ(current, "the Request whose body is being read"),
    OBJ(fast, "the fast lane's reusable Request"),
    OBJ(address, "the peer's address"),
    {"deadline", T_DOUBLE, offsetof(FastConnectionObject, deadline), 0, NULL},
    {"timer", T_INT, offsetof(FastConnectionObject, timer), 0, "what the deadline is for"},
    {"busy", T_BOOL, offsetof(FastConnectionObject, busy), 0, NULL},
    {"paused", T_BOOL, offsetof(FastConnectionObject, paused), 0, NULL},
    {"write_paused", T_BOOL, offsetof(FastConnectionObject, write_paused), 0, NULL},
    {"stopped", T_BOOL, offsetof(FastConnectionObject, stopped), 0, NULL},
    {"closing", T_BOOL, offsetof(FastConnectionObject, closing), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};
#undef OBJ

static PyTypeObject FastConnectionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tb_gateway._speedups.FastConnection",
    .tp_basicsize = sizeof(FastConnectionObject),
    .tp_dealloc = (destructor)fast_connection_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)fast_connection_traverse,
    .tp_clear = (inquiry)fast_connection_clear,
    .tp_methods = fast_connection_methods,
    .tp_members = fast_connection_members,
    .tp_new = fast_connection_new,
    .tp_doc = "The C base of http/connection.py's HttpConnection: the fast lane and its hot state",
};

static int
http_lane_traverse(HttpLaneObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->server);
    Py_VISIT(self->api);
    Py_VISIT(self->routes);
    Py_VISIT(self->http);
    Py_VISIT(self->keep);
    Py_VISIT(self->outcome_type);
    Py_VISIT(self->delivered);
    Py_VISIT(self->ticket_type);
    Py_VISIT(self->when_settled);
    Py_VISIT(self->responses);
    Py_VISIT(self->ack_latency);
    Py_VISIT(self->known_device);
    return 0;
}

static int
http_lane_clear(HttpLaneObject *self)
{
    Py_CLEAR(self->server);
    Py_CLEAR(self->api);
    Py_CLEAR(self->routes);
    Py_CLEAR(self->http);
    Py_CLEAR(self->keep);
    Py_CLEAR(self->outcome_type);
    Py_CLEAR(self->delivered);
    Py_CLEAR(self->ticket_type);
    Py_CLEAR(self->when_settled);
    Py_CLEAR(self->responses);
    Py_CLEAR(self->ack_latency);
    Py_CLEAR(self->known_device);
    return 0;
}

static void
http_lane_dealloc(HttpLaneObject *self)
{
    PyObject_GC_UnTrack(self);
    http_lane_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
http_lane_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *server, *api, *http, *keep, *outcome_type, *delivered, *ticket_type, *when_settled, *responses,
        *ack_latency;
    Py_ssize_t max_head, max_routes;
    if ((kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) ||
        !PyArg_ParseTuple(args, "OOOOO!OO!OOOnn:HttpLane", &server, &api, &http, &keep, &PyType_Type, &outcome_type,
                          &delivered, &PyType_Type, &ticket_type, &when_settled, &responses, &ack_latency,
                          &max_head, &max_routes)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "HttpLane takes positional arguments only");
        }
        return NULL;
    }
    HttpLaneObject *self = (HttpLaneObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->routes = PyDict_New();
    if (self->routes == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->server = Py_NewRef(server);
    self->api = Py_NewRef(api);
    self->http = Py_NewRef(http);
    self->keep = Py_NewRef(keep);
    self->outcome_type = Py_NewRef(outcome_type);
    self->delivered = Py_NewRef(delivered);
    self->ticket_type = Py_NewRef(ticket_type);
    self->when_settled = Py_NewRef(when_settled);
    self->responses = Py_NewRef(responses);
    self->ack_latency = Py_NewRef(ack_latency);
    self->known_device = PyObject_GetAttr(api, known_device_name);
    if (self->known_device == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->max_head = max_head;
    self->max_routes = max_routes;
    return (PyObject *)self;
}

static PyMemberDef http_lane_members[] = {
    {"taken", T_PYSSIZET, offsetof(HttpLaneObject, taken), READONLY, "requests the fast lane took"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject HttpLaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tb_gateway._speedups.HttpLane",
    .tp_basicsize = sizeof(HttpLaneObject),
    .tp_dealloc = (destructor)http_lane_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)http_lane_traverse,
    .tp_clear = (inquiry)http_lane_clear,
    .tp_members = http_lane_members,
    .tp_new = http_lane_new,
    .tp_doc = "What the HTTP fast lane shares across an HttpServer's connections (http/server.py)",
};

/* ------------------------------------------------------------------------------------------------------------
 * The CoAP lane (coap/server.py): CoapLane.receive(datagrams, now) is the loop of CoapServer.datagrams_received
 * over Endpoint.receive_datagram and the routes. A POST (CON or NON) with only Uri-Path and Content-Format
 * options that is not a duplicate goes through the endpoint's intake (de-duplication entry, piggyback
 * deadline) and the server's (pending count, route, auth cache, DeviceApi.post) here; its answer, once
 * delivered and still due piggybacked, is CoapAnswer: the 2.01 in the ACK, the reply kept for duplicates.
 * Everything else goes to the Python methods where the Python path would be at that point: _receive_one
 * (the datagram), _on_request (the request, once the endpoint took it), _posted, _post_failed, _delivered.
 */

typedef struct {
    PyObject_HEAD
    PyObject *server, *endpoint, *api;
    PyObject *make_exchange;    /* coap/server.py's _EXCHANGE: an Exchange from its slots */
    PyObject *request_received; /* endpoint.request_received(exchange): the event */
    PyObject *routes;           /* {the options' bytes: (credentials, kind) | None}: CoapServer._post_route, cached */
    PyObject *pending_state, *answered_state, *coap, *delivered, *ticket_type, *when_settled;
    double exchange_lifetime, non_lifetime; /* the endpoint's config: the de-duplication lifetimes */
    PyObject *known_device;                     /* api.known_device when the lane was made */
    double piggyback_timeout;
    Py_ssize_t max_routes;
} CoapLaneObject;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *lane, *exchange, *device;
} CoapAnswerObject;

static PyObject *seen_name, *replace_name,
    *piggyback_name, *outbox_name, *sweep_at_name, *sweep_name, *accepting_name, *pending_attr_name,
    *max_pending_name, *max_payload_attr_name, *latency_name, *idle_name, *flush_scheduled_name, *loop_attr_name,
    *receive_one_name, *on_request_name, *post_route_name, *posted_name, *post_failed_name, *delivered_name,
    *schedule_flush_name, *state_name, *confirmable_name, *block1_name, *block2_name, *observation_name,
    *received_at_name_, *reply_name, *deadline_name, *set_name, *config_name, *exchange_lifetime_name,
    *non_lifetime_name, *piggyback_timeout_name, *result_name_c, *cancelled_name_c, *addr_name_c, *mid_name_c,
    *token_name_c;

static PyObject *coap_answer_call(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames);

static PyTypeObject CoapAnswerType;

/* obj.name as a Py_ssize_t (-1 with an error) and obj.name = n, through the call site's attribute cache */
#define attr_ssize(obj, name)                                                                                  \
    __extension__({                                                                                            \
        PyObject *value_ = GETATTR((obj), (name));                                                             \
        Py_ssize_t size_ = value_ == NULL ? -1 : PyLong_AsSsize_t(value_);                                     \
        Py_XDECREF(value_);                                                                                    \
        size_;                                                                                                 \
    })
#define set_ssize(obj, name, n)                                                                                \
    __extension__({                                                                                            \
        PyObject *value_ = PyLong_FromSsize_t(n);                                                              \
        int rc_ = value_ == NULL ? -1 : SETATTR((obj), (name), value_);                                        \
        Py_XDECREF(value_);                                                                                    \
        rc_;                                                                                                   \
    })

static int
call_method_none(PyObject *obj, PyObject *name, PyObject *const *args, size_t nargs)
{
    PyObject *stack[5] = {obj};
    for (size_t i = 0; i < nargs && i < 4; i++) {
        stack[i + 1] = args[i];
    }
    PyObject *none = PyObject_VectorcallMethod(name, stack, (nargs + 1) | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_XDECREF(none);
    return none == NULL ? -1 : 0;
}

/* The request's credentials and kind when it is a device-message POST, NULL without an error when not */
static PyObject *
coap_route(CoapLaneObject *lane, PyObject *options, PyObject *exchange)
{
    PyObject *found = PyDict_GetItemWithError(lane->routes, options);
    if (found == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        PyObject *route = PyObject_CallMethodOneArg(lane->server, post_route_name, exchange);
        if (route == NULL) {
            return NULL;
        }
        found = route != Py_None && PyTuple_Check(route) && PyTuple_GET_SIZE(route) == 2
                    ? route_entry(PyTuple_GET_ITEM(route, 0), PyTuple_GET_ITEM(route, 1))
                    : Py_NewRef(Py_None);
        Py_DECREF(route);
        if (found == NULL) {
            return NULL;
        }
        if (PyDict_GET_SIZE(lane->routes) >= lane->max_routes) {
            PyDict_Clear(lane->routes);
        }
        int rc = PyDict_SetItem(lane->routes, options, found);
        Py_DECREF(found); /* the dict holds it */
        if (rc < 0) {
            return NULL;
        }
    }
    return found == Py_None ? NULL : found; /* borrowed */
}

/* The server's part of a request the endpoint took: 0 done, 1 hand to _on_request, -1 error */
static int
coap_serve(CoapLaneObject *lane, PyObject *exchange, PyObject *addr, PyObject *shape, PyObject *payload)
{
    PyObject *server = lane->server;
    int accepting = attr_is_true(server, accepting_name);
    Py_ssize_t pending = accepting == 1 ? attr_ssize(server, pending_attr_name) : -1;
    Py_ssize_t max_pending = pending >= 0 ? attr_ssize(server, max_pending_name) : -1;
    Py_ssize_t max_payload = max_pending >= 0 ? attr_ssize(server, max_payload_attr_name) : -1;
    if (PyErr_Occurred()) {
        return -1;
    }
    if (accepting != 1 || pending + 1 > max_pending || PyBytes_GET_SIZE(payload) > max_payload) {
        return 1;
    }
    PyObject *route = coap_route(lane, shape, exchange);
    if (route == NULL || !PyTuple_Check(route) || PyTuple_GET_SIZE(route) != 3) {
        return PyErr_Occurred() ? -1 : 1;
    }
    Py_INCREF(route);
    PyObject *credentials = PyTuple_GET_ITEM(route, 0), *kind = PyTuple_GET_ITEM(route, 1);
    PyObject *host = PyTuple_Check(addr) && PyTuple_GET_SIZE(addr) > 0 ? PyTuple_GET_ITEM(addr, 0) : Py_None;
    PyObject *device =
        lookup_device(lane->api, lane->known_device, credentials, PyTuple_GET_ITEM(route, 2), lane->coap, host, monotonic_s());
    PyObject *post = NULL, *result = NULL;
    int rc = device == NULL ? -1 : device == Py_None ? 1 : 0;
    if (rc != 0 || set_ssize(server, pending_attr_name, pending + 1) < 0 ||
        (post = GETATTR(lane->api, post_name)) == NULL) {
        rc = rc ? rc : -1;
        goto done;
    }
    PyObject *post_args[] = {device, kind, payload, lane->coap};
    result = PyObject_Vectorcall(post, post_args, 4, NULL);
    if (result == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) {
            rc = -1;
            goto done;
        }
        PyObject *type, *exc, *traceback;
        PyErr_Fetch(&type, &exc, &traceback);
        PyErr_NormalizeException(&type, &exc, &traceback);
        if (exc != NULL && traceback != NULL) {
            PyException_SetTraceback(exc, traceback);
        }
        PyObject *failed_args[] = {exchange, exc};
        rc = exc == NULL ? -1 : call_method_none(server, post_failed_name, failed_args, 2);
        Py_XDECREF(type);
        Py_XDECREF(exc);
        Py_XDECREF(traceback);
        goto done;
    }
    if (!Py_IS_TYPE(result, (PyTypeObject *)lane->ticket_type)) { /* an Outcome: answered at once */
        PyObject *posted_args[] = {exchange, device, result};
        rc = call_method_none(server, posted_name, posted_args, 3);
        goto done;
    }
    CoapAnswerObject *answer = PyObject_GC_New(CoapAnswerObject, &CoapAnswerType);
    if (answer == NULL) {
        rc = -1;
        goto done;
    }
    answer->lane = Py_NewRef((PyObject *)lane);
    answer->exchange = Py_NewRef(exchange);
    answer->device = Py_NewRef(device);
    answer->vectorcall = coap_answer_call;
    PyObject_GC_Track(answer);
    PyObject *then = GETATTR(result, then_name);
    PyObject *done_now = then == Py_None ? CALL0(result, done_name_) : NULL;
    if (then != NULL && then == Py_None && done_now == Py_False) {
        rc = SETATTR(result, then_name, (PyObject *)answer);
    }
    else if (then != NULL && (then != Py_None || done_now != NULL)) { /* pipeline.when_settled's other cases */
        PyObject *none = PyObject_CallFunctionObjArgs(lane->when_settled, result, (PyObject *)answer, NULL);
        rc = none == NULL ? -1 : 0;
        Py_XDECREF(none);
    }
    else {
        rc = -1;
    }
    Py_XDECREF(then);
    Py_XDECREF(done_now);
    Py_DECREF(answer);
done:
    Py_DECREF(route);
    Py_XDECREF(device);
    Py_XDECREF(post);
    Py_XDECREF(result);
    return rc;
}

/* One datagram: 1 taken (served or handed on after the endpoint's intake), 0 not taken, -1 error */
static int
coap_take(CoapLaneObject *lane, PyObject *data, PyObject *addr, double now)
{
    if (!PyBytes_CheckExact(data)) {
        return 0;
    }
    PyObject *fields = speedups_coap_decode(NULL, &data, 1);
    if (fields == NULL || fields == Py_None) {
        Py_XDECREF(fields);
        return fields == NULL ? -1 : 0;
    }
    long type = PyLong_AsLong(PyTuple_GET_ITEM(fields, 0)), code = PyLong_AsLong(PyTuple_GET_ITEM(fields, 1));
    PyObject *mid = PyTuple_GET_ITEM(fields, 2), *token = PyTuple_GET_ITEM(fields, 3);
    PyObject *options = PyTuple_GET_ITEM(fields, 4), *payload = PyTuple_GET_ITEM(fields, 5);
    int plain = (type == 0 || type == 1) && code == 2 && PyTuple_GET_SIZE(options) > 0; /* CON / NON POST */
    int formats = 0;
    for (Py_ssize_t i = 0; plain && i < PyTuple_GET_SIZE(options); i++) { /* Uri-Path, one Content-Format */
        long number = PyLong_AsLong(PyTuple_GET_ITEM(PyTuple_GET_ITEM(options, i), 0));
        formats += number == 12;
        plain = (number == 11 || number == 12) && formats <= 1;
    }
    long number = plain ? PyLong_AsLong(mid) : -1;
    PyObject *seen = plain ? GETATTR(lane->endpoint, seen_name) : NULL;
    PyObject *exchange = NULL, *piggyback = NULL;
    int rc = -1;
    /* the C table (_seen.c) only: the Python map (a window of 0) means the endpoint's own path */
    if (seen == NULL || !seen_table_check(seen) || number < 0 || number > 0xFFFF) {
        rc = PyErr_Occurred() ? -1 : 0;
        goto done;
    }
    if (seen_table_lookup(seen, addr, (unsigned int)number) != NULL || PyErr_Occurred()) {
        rc = PyErr_Occurred() ? -1 : 0; /* a duplicate: the endpoint answers it (the reply kept, or nothing) */
        goto done;
    }
    int con = type == 0;
    PyObject *now_obj = PyFloat_FromDouble(now), *zero = PyFloat_FromDouble(0.0);
    if (now_obj != NULL && zero != NULL) {
        PyObject *args[] = {addr, mid, token, PyTuple_GET_ITEM(fields, 1), options, payload, con ? Py_True : Py_False,
                            now_obj, lane->pending_state, zero, Py_None, Py_None, Py_None, Py_None};
        exchange = PyObject_Vectorcall(lane->make_exchange, args, 14, NULL);
    }
    Py_XDECREF(now_obj);
    Py_XDECREF(zero);
    if (exchange == NULL || seen_table_put(seen, addr, (unsigned int)number, exchange, now,
                                           con ? lane->exchange_lifetime : lane->non_lifetime) < 0) {
        goto done;
    }
    if (con) { /* the empty ACK is due at the deadline unless answered before (Endpoint.handle_timer) */
        PyObject *deadline = PyFloat_FromDouble(now + lane->piggyback_timeout);
        piggyback = deadline == NULL ? NULL : GETATTR(lane->endpoint, piggyback_name);
        PyObject *none = piggyback == NULL || SETATTR(exchange, deadline_name, deadline) < 0
                             ? NULL
                             : CALL1(piggyback, append_name, exchange);
        Py_XDECREF(deadline);
        if (none == NULL) {
            goto done;
        }
        Py_DECREF(none);
    }
    /* the route is cached by the options' bytes as sent (they decode to the same options every time):
     * hashing and comparing them is one pass over a few bytes, not a tuple of (number, value) pairs */
    Py_ssize_t start = 4 + PyBytes_GET_SIZE(token), size = PyBytes_GET_SIZE(data);
    Py_ssize_t end = size - PyBytes_GET_SIZE(payload) - (PyBytes_GET_SIZE(payload) > 0);
    PyObject *shape = start <= end && end <= size
                          ? PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + start, end - start)
                          : Py_NewRef(options);
    rc = shape == NULL ? -1 : coap_serve(lane, exchange, addr, shape, payload);
    Py_XDECREF(shape);
    if (rc == 1) { /* the request as the endpoint hands it over: the Python routes take it from here */
        PyObject *event = PyObject_CallOneArg(lane->request_received, exchange);
        rc = event == NULL ? -1 : call_method_none(lane->server, on_request_name, &event, 1);
        Py_XDECREF(event);
    }
    rc = rc < 0 ? -1 : 1;
done:
    Py_DECREF(fields);
    Py_XDECREF(seen);
    Py_XDECREF(exchange);
    Py_XDECREF(piggyback);
    return rc;
}

/* CoapLane.receive(datagrams, now) */
static PyObject *
coap_lane_receive(CoapLaneObject *lane, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "receive(datagrams: list, now: float)");
        return NULL;
    }
    PyObject *datagrams = args[0], *now_obj = args[1];
    double now = PyFloat_AsDouble(now_obj);
    PyObject *sweep_at = PyErr_Occurred() ? NULL : GETATTR(lane->endpoint, sweep_at_name);
    double due = sweep_at == NULL ? 0.0 : PyFloat_AsDouble(sweep_at);
    Py_XDECREF(sweep_at);
    if (sweep_at == NULL || PyErr_Occurred() || (now >= due && call_method_none(lane->endpoint, sweep_name, &now_obj, 1) < 0)) {
        return NULL; /* the endpoint's expiry sweep, as receive_datagram runs it first */
    }
    Py_INCREF(lane);
    Py_INCREF(datagrams);
    int failed = 0;
    for (Py_ssize_t i = 0; !failed && i < PyList_GET_SIZE(datagrams); i++) {
        PyObject *pair = Py_NewRef(PyList_GET_ITEM(datagrams, i));
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "receive: expected (data, address) pairs");
            failed = 1;
        }
        else {
            PyObject *data = PyTuple_GET_ITEM(pair, 0), *addr = PyTuple_GET_ITEM(pair, 1);
            int taken = coap_take(lane, data, addr, now);
            PyObject *one_args[] = {data, addr, now_obj};
            failed = taken < 0 || (taken == 0 && call_method_none(lane->server, receive_one_name, one_args, 3) < 0);
        }
        Py_DECREF(pair);
    }
    Py_DECREF(datagrams);
    Py_DECREF(lane);
    if (failed) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The request's message is settled: a delivered one still due piggybacked is answered 2.01 here (what
 * CoapServer._delivered -> _outcome -> _answer -> Endpoint.respond do then); anything else goes there. */
static PyObject *
coap_answer_call(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    CoapAnswerObject *self = (CoapAnswerObject *)callable;
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "CoapAnswer(future)");
        return NULL;
    }
    CoapLaneObject *lane = (CoapLaneObject *)self->lane;
    PyObject *future = args[0], *exchange = self->exchange, *server = lane->server;
    PyObject *cancelled = CALL0(future, cancelled_name_c);
    PyObject *outcome = cancelled == Py_False ? CALL0(future, result_name_c) : NULL;
    int plain = outcome != NULL && outcome == lane->delivered;
    Py_XDECREF(cancelled);
    Py_XDECREF(outcome);
    if (cancelled == NULL || (cancelled == Py_False && outcome == NULL)) {
        return NULL;
    }
    if (plain) {
        PyObject *state = GETATTR(exchange, state_name);
        int confirmable = attr_is_true(exchange, confirmable_name);
        int unblocked = attr_is_none(exchange, block1_name) == 1 && attr_is_none(exchange, block2_name) == 1 &&
                        attr_is_none(exchange, observation_name) == 1;
        plain = state != NULL && PyObject_RichCompareBool(state, lane->pending_state, Py_EQ) == 1 &&
                confirmable == 1 && unblocked;
        Py_XDECREF(state);
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    if (!plain) {
        PyObject *delivered_args[] = {exchange, self->device, future};
        return call_method_none(server, delivered_name, delivered_args, 3) < 0 ? NULL : Py_NewRef(Py_None);
    }
    PyObject *result = NULL, *loop = NULL, *now = NULL, *received = NULL, *latency = NULL, *reply = NULL,
             *addr = NULL, *mid = NULL, *token = NULL, *key = NULL, *seen = NULL, *outbox = NULL, *out = NULL,
             *idle = NULL;
    Py_INCREF(self);
    loop = GETATTR(server, loop_attr_name);
    now = loop == NULL ? NULL : CALL0(loop, time_name);
    received = now == NULL ? NULL : GETATTR(exchange, received_at_name_);
    latency = received == NULL ? NULL : PyNumber_Subtract(now, received);
    PyObject *histogram = latency == NULL ? NULL : GETATTR(server, latency_name);
    double seconds = histogram == NULL ? 0.0 : PyFloat_AsDouble(latency);
    int failed = histogram == NULL || PyErr_Occurred() || observe_seconds(histogram, seconds) < 0;
    Py_XDECREF(histogram);
    Py_ssize_t pending = failed ? -1 : attr_ssize(server, pending_attr_name);
    if (pending < 0 || set_ssize(server, pending_attr_name, pending - 1) < 0) {
        goto done;
    }
    if (pending - 1 == 0) { /* drain waits for the last answer */
        idle = GETATTR(server, idle_name);
        if (idle == NULL || (idle != Py_None && call_method_none(idle, set_name, NULL, 0) < 0)) {
            goto done;
        }
    }
    addr = GETATTR(exchange, addr_name_c);
    mid = addr == NULL ? NULL : GETATTR(exchange, mid_name_c);
    token = mid == NULL ? NULL : GETATTR(exchange, token_name_c);
    long number = token == NULL ? -1 : PyLong_AsLong(mid);
    if (token == NULL || !PyBytes_Check(token) || PyBytes_GET_SIZE(token) > 8 || number < 0 || number > 0xFFFF) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "CoapAnswer: a malformed exchange");
        }
        goto done;
    }
    Py_ssize_t tkl = PyBytes_GET_SIZE(token);
    unsigned char header[4] = {(unsigned char)(0x60 | tkl), 65 /* 2.01 */, (unsigned char)(number >> 8), (unsigned char)number};
    reply = PyBytes_FromStringAndSize(NULL, 4 + tkl);
    if (reply == NULL) {
        goto done;
    }
    memcpy(PyBytes_AS_STRING(reply), header, 4);
    memcpy(PyBytes_AS_STRING(reply) + 4, PyBytes_AS_STRING(token), (size_t)tkl);
    seen = GETATTR(lane->endpoint, seen_name);
    if (seen == NULL || SETATTR(exchange, reply_name, reply) < 0 ||
        SETATTR(exchange, state_name, lane->answered_state) < 0) {
        goto done;
    }
    if (seen_table_check(seen)) { /* duplicates now get the reply (Endpoint.respond) */
        if (seen_table_replace(seen, addr, (unsigned int)number, exchange, reply) < 0) {
            goto done;
        }
    }
    else {
        key = PyTuple_Pack(2, addr, mid);
        PyObject *replace_args[] = {key, exchange, reply};
        if (key == NULL || call_method_none(seen, replace_name, replace_args, 3) < 0) {
            goto done;
        }
    }
    outbox = GETATTR(lane->endpoint, outbox_name);
    out = outbox == NULL ? NULL : PyTuple_Pack(2, reply, addr);
    if (out == NULL || !PyList_Check(outbox) || PyList_Append(outbox, out) < 0) {
        goto done;
    }
    int scheduled = attr_is_true(server, flush_scheduled_name);
    if (scheduled < 0 || (scheduled == 0 && call_method_none(server, schedule_flush_name, NULL, 0) < 0)) {
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(loop);
    Py_XDECREF(now);
    Py_XDECREF(received);
    Py_XDECREF(latency);
    Py_XDECREF(reply);
    Py_XDECREF(addr);
    Py_XDECREF(mid);
    Py_XDECREF(token);
    Py_XDECREF(key);
    Py_XDECREF(seen);
    Py_XDECREF(outbox);
    Py_XDECREF(out);
    Py_XDECREF(idle);
    Py_DECREF(self);
    if (result == NULL && !PyErr_Occurred()) {
        PyErr_SetString(PyExc_SystemError, "CoapAnswer: no answer");
    }
    return result;
}

static int
coap_answer_traverse(CoapAnswerObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->lane);
    Py_VISIT(self->exchange);
    Py_VISIT(self->device);
    return 0;
}

static int
coap_answer_clear(CoapAnswerObject *self)
{
    Py_CLEAR(self->lane);
    Py_CLEAR(self->exchange);
    Py_CLEAR(self->device);
    return 0;
}

static void
coap_answer_dealloc(CoapAnswerObject *self)
{
    PyObject_GC_UnTrack(self);
    coap_answer_clear(self);
    PyObject_GC_Del(self);
}

static PyTypeObject CoapAnswerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tb_gateway._speedups.CoapAnswer",
    .tp_basicsize = sizeof(CoapAnswerObject),
    .tp_dealloc = (destructor)coap_answer_dealloc,
    .tp_vectorcall_offset = offsetof(CoapAnswerObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)coap_answer_traverse,
    .tp_clear = (inquiry)coap_answer_clear,
    .tp_doc = "A CoAP request's pipeline callback: its 2.01, or CoapServer._delivered (_lanes.c)",
};

static int
coap_lane_traverse(CoapLaneObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->server);
    Py_VISIT(self->endpoint);
    Py_VISIT(self->api);
    Py_VISIT(self->make_exchange);
    Py_VISIT(self->request_received);
    Py_VISIT(self->routes);
    Py_VISIT(self->pending_state);
    Py_VISIT(self->answered_state);
    Py_VISIT(self->coap);
    Py_VISIT(self->delivered);
    Py_VISIT(self->ticket_type);
    Py_VISIT(self->when_settled);
    Py_VISIT(self->known_device);
    return 0;
}

static int
coap_lane_clear(CoapLaneObject *self)
{
    Py_CLEAR(self->server);
    Py_CLEAR(self->endpoint);
    Py_CLEAR(self->api);
    Py_CLEAR(self->make_exchange);
    Py_CLEAR(self->request_received);
    Py_CLEAR(self->routes);
    Py_CLEAR(self->pending_state);
    Py_CLEAR(self->answered_state);
    Py_CLEAR(self->coap);
    Py_CLEAR(self->delivered);
    Py_CLEAR(self->ticket_type);
    Py_CLEAR(self->when_settled);
    Py_CLEAR(self->known_device);
    return 0;
}

static void
coap_lane_dealloc(CoapLaneObject *self)
{
    PyObject_GC_UnTrack(self);
    coap_lane_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* CoapLane(server, endpoint, api, make_exchange, request_received, pending, answered, coap, delivered,
 *          ticket_type, when_settled, max_routes) */
static PyObject *
coap_lane_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *server, *endpoint, *api, *make_exchange, *request_received, *pending, *answered, *coap, *delivered,
        *ticket_type, *when_settled;
    Py_ssize_t max_routes;
    if ((kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) ||
        !PyArg_ParseTuple(args, "OOOOOOOOOO!On:CoapLane", &server, &endpoint, &api, &make_exchange,
                          &request_received, &pending, &answered, &coap, &delivered, &PyType_Type, &ticket_type,
                          &when_settled, &max_routes)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "CoapLane takes positional arguments only");
        }
        return NULL;
    }
    PyObject *config = GETATTR(endpoint, config_name);
    PyObject *exchange_lifetime = config == NULL ? NULL : GETATTR(config, exchange_lifetime_name);
    PyObject *non_lifetime = exchange_lifetime == NULL ? NULL : GETATTR(config, non_lifetime_name);
    PyObject *piggyback = non_lifetime == NULL ? NULL : GETATTR(config, piggyback_timeout_name);
    double piggyback_timeout = piggyback == NULL ? 0.0 : PyFloat_AsDouble(piggyback);
    double exchange_lifetime_s = piggyback == NULL ? 0.0 : PyFloat_AsDouble(exchange_lifetime);
    double non_lifetime_s = piggyback == NULL ? 0.0 : PyFloat_AsDouble(non_lifetime);
    Py_XDECREF(config);
    Py_XDECREF(piggyback);
    Py_XDECREF(exchange_lifetime);
    Py_XDECREF(non_lifetime);
    CoapLaneObject *self = PyErr_Occurred() || piggyback == NULL ? NULL : (CoapLaneObject *)type->tp_alloc(type, 0);
    PyObject *routes = self == NULL ? NULL : PyDict_New();
    if (routes == NULL) {
        Py_XDECREF(self);
        return NULL;
    }
    self->routes = routes;
    self->exchange_lifetime = exchange_lifetime_s;
    self->non_lifetime = non_lifetime_s;
    self->piggyback_timeout = piggyback_timeout;
    self->server = Py_NewRef(server);
    self->endpoint = Py_NewRef(endpoint);
    self->api = Py_NewRef(api);
    self->make_exchange = Py_NewRef(make_exchange);
    self->request_received = Py_NewRef(request_received);
    self->pending_state = Py_NewRef(pending);
    self->answered_state = Py_NewRef(answered);
    self->coap = Py_NewRef(coap);
    self->delivered = Py_NewRef(delivered);
    self->ticket_type = Py_NewRef(ticket_type);
    self->when_settled = Py_NewRef(when_settled);
    self->max_routes = max_routes;
    self->known_device = GETATTR(api, known_device_name);
    if (self->known_device == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyMethodDef coap_lane_methods[] = {
    {"receive", (PyCFunction)(void (*)(void))coap_lane_receive, METH_FASTCALL,
     "receive(datagrams, now): CoapServer.datagrams_received's loop, the common request in C"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CoapLaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tb_gateway._speedups.CoapLane",
    .tp_basicsize = sizeof(CoapLaneObject),
    .tp_dealloc = (destructor)coap_lane_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)coap_lane_traverse,
    .tp_clear = (inquiry)coap_lane_clear,
    .tp_methods = coap_lane_methods,
    .tp_new = coap_lane_new,
    .tp_doc = "The CoAP server's common request in C (coap/server.py)",
};

/* run_settled(waiting, report): pipeline.py's loop over the settled tickets that have callbacks waiting (what
 * settle_delivered returns): each done one's callbacks in the order they were registered, once; a callback
 * that raises an Exception is reported with report(ticket, exc) and the others still run. */
static PyObject *
run_settled(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "run_settled(waiting: list, report)");
        return NULL;
    }
    PyObject *waiting = args[0], *report = args[1];
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(waiting); i++) {
        PyObject *ticket = Py_NewRef(PyList_GET_ITEM(waiting, i));
        PyObject *then = GETATTR(ticket, then_name);
        PyObject *done = then == NULL || then == Py_None ? NULL : CALL0(ticket, done_name_);
        int failed = then == NULL || (then != Py_None && done == NULL);
        if (done == Py_True) {
            failed = SETATTR(ticket, then_name, Py_None) < 0;
            int many = PyList_Check(then);
            for (Py_ssize_t k = 0; !failed && k < (many ? PyList_GET_SIZE(then) : 1); k++) {
                PyObject *callback = Py_NewRef(many ? PyList_GET_ITEM(then, k) : then);
                PyObject *result = PyObject_CallOneArg(callback, ticket);
                Py_DECREF(callback);
                if (result != NULL) {
                    Py_DECREF(result);
                    continue;
                }
                if (!PyErr_ExceptionMatches(PyExc_Exception)) {
                    failed = 1; /* KeyboardInterrupt, SystemExit: not a transport's bug */
                    break;
                }
                PyObject *type, *exc, *traceback;
                PyErr_Fetch(&type, &exc, &traceback);
                PyErr_NormalizeException(&type, &exc, &traceback);
                if (exc != NULL && traceback != NULL) {
                    PyException_SetTraceback(exc, traceback);
                }
                PyObject *reported = exc == NULL ? NULL : PyObject_CallFunctionObjArgs(report, ticket, exc, NULL);
                Py_XDECREF(type);
                Py_XDECREF(exc);
                Py_XDECREF(traceback);
                failed = reported == NULL;
                Py_XDECREF(reported);
            }
        }
        Py_XDECREF(done);
        Py_XDECREF(then);
        Py_DECREF(ticket);
        if (failed) {
            return NULL;
        }
    }
    Py_RETURN_NONE;
}

/* observe(child, seconds): what the lanes do for each answer's latency (tests/test_lanes.py compares) */
static PyObject *
observe(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    double seconds = nargs == 2 ? PyFloat_AsDouble(args[1]) : -1.0;
    if (nargs != 2 || PyErr_Occurred()) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "observe(child, seconds: float)");
        }
        return NULL;
    }
    return observe_seconds(args[0], seconds) < 0 ? NULL : Py_NewRef(Py_None);
}

/* drop_front(queue, name, value): pop the deque's front while its ``name`` attribute is not ``value`` (the
 * endpoint's piggyback queue: the exchanges answered since its last look leave, one a request) */
static PyObject *
drop_front(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyUnicode_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "drop_front(queue, name: str, value)");
        return NULL;
    }
    PyObject *queue = args[0], *name = args[1], *value = args[2];
    for (;;) {
        Py_ssize_t size = PyObject_Length(queue);
        if (size <= 0) {
            return size < 0 ? NULL : Py_NewRef(Py_None);
        }
        PyObject *front = PySequence_GetItem(queue, 0);
        PyObject *state = front == NULL ? NULL : PyObject_GetAttr(front, name);
        int keep = state == NULL ? -1 : state == value ? 1 : PyObject_RichCompareBool(state, value, Py_EQ);
        Py_XDECREF(front);
        Py_XDECREF(state);
        if (keep != 0) {
            return keep < 0 ? NULL : Py_NewRef(Py_None);
        }
        PyObject *gone = CALL0(queue, popleft_name_);
        if (gone == NULL) {
            return NULL;
        }
        Py_DECREF(gone);
    }
}

static PyMethodDef lane_functions[] = {
    {"drop_front", (PyCFunction)(void (*)(void))drop_front, METH_FASTCALL,
     "drop_front(queue, name, value): pop the front while its attribute `name` is not `value`"},
    {"observe", (PyCFunction)(void (*)(void))observe, METH_FASTCALL,
     "observe(child, seconds): a histogram child's observe, as the lanes do it"},
    {"run_settled", (PyCFunction)(void (*)(void))run_settled, METH_FASTCALL,
     "run_settled(waiting, report): run the callbacks of the settled tickets, in order"},
    {NULL, NULL, 0, NULL},
};

int
lanes_init(PyObject *module)
{
    struct {
        PyObject **name;
        const char *text;
    } names[] = {
        {&limiter_name, "limiter"},       {&downlink_name, "downlink"},       {&states_name, "_states"},
        {&id_name, "id"},                 {&active_name, "active"},           {&last_activity_name, "last_activity"},
        {&activity_name, "activity"},     {&value_name, "value"},             {&pipeline_name, "pipeline"},
        {&closing_name, "_closing"},      {&queue_name, "_queue"},            {&tickets_name, "_tickets"},
        {&max_queue_name, "_max_queue"},  {&event_loop_name, "_event_loop"}, {&deliver_then_name, "_deliver_then"},
        {&kick_due_name, "_kick_due"},    {&kick_name, "_kick_next_pass"},    {&append_name, "append"},
        {&wakeup_name, "_wakeup"},        {&event_value_name, "_value"},            {&set_name, "set"},
        {&pending_name, "pending"},       {&outcome_name, "outcome"},         {&then_name, "then"},
        {&activity_seen_name, "activity_seen"}, {&now_ms_name, "now_ms"},
        {&pipeline_name_, "pipeline"},    {&poll_name, "poll"},               {&known_device_name, "known_device"},
        {&post_name, "post"},             {&draining_name, "draining"},       {&route_name, "route"},
        {&persist_name, "persist"},       {&device_attr_name, "device"},      {&done_at_name, "done_at"},
        {&fatal_name, "fatal"},           {&popleft_name_, "popleft"},        {&write_name, "write"},
        {&is_closing_name, "is_closing"}, {&time_name, "time"},               {&table_name, "table"},
        {&observe_name, "observe"},       {&cancelled_name, "cancelled"},     {&result_name_, "result"},
        {&done_name_, "done"},            {&read_name, "_read"},              {&fast_failed_name, "_fast_failed"},
        {&fast_answered_name, "_fast_answered"}, {&fast_resume_name, "_fast_resume"},
        {&fast_settled_name, "_fast_settled"}, {&then_name_, "then"},        {&max_payload_name, "max_payload"},
        {&idle_timeout_name, "idle_timeout"},
        {&seen_name, "_seen"},            {&replace_name, "replace"},         {&piggyback_name, "_piggyback"},    {&outbox_name, "_outbox"},
        {&sweep_at_name, "_sweep_at"},    {&sweep_name, "_sweep"},            {&accepting_name, "_accepting"},
        {&pending_attr_name, "_pending"}, {&max_pending_name, "_max_pending"}, {&max_payload_attr_name, "_max_payload"},
        {&latency_name, "_latency"},      {&idle_name, "_idle"},              {&flush_scheduled_name, "_flush_scheduled"},
        {&loop_attr_name, "_loop"},       {&receive_one_name, "_receive_one"}, {&on_request_name, "_on_request"},
        {&post_route_name, "_post_route"}, {&posted_name, "_posted"},         {&post_failed_name, "_post_failed"},
        {&delivered_name, "_delivered"},  {&schedule_flush_name, "_schedule_flush"}, {&state_name, "state"},
        {&confirmable_name, "confirmable"}, {&block1_name, "block1"},         {&block2_name, "block2"},
        {&observation_name, "observation"}, {&received_at_name_, "received_at"}, {&reply_name, "reply"},
        {&deadline_name, "deadline"},     {&set_name, "set"},                 {&config_name, "config"},
        {&exchange_lifetime_name, "exchange_lifetime_s"}, {&non_lifetime_name, "non_lifetime_s"},
        {&piggyback_timeout_name, "piggyback_timeout_s"}, {&result_name_c, "result"},
        {&cancelled_name_c, "cancelled"}, {&addr_name_c, "addr"},             {&mid_name_c, "mid"},
        {&token_name_c, "token"},         {&blocklist_name, "_blocklist"},    {&clock_name, "_clock"},
        {&cache_name, "_cache"},          {&identity_name, "identity"},       {&expires_at_name, "expires_at"},
        {&bounds_name, "_bounds"},        {&buckets_name, "buckets"},         {&count_name, "count"},
        {&sum_name, "sum"},
    };
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        *names[i].name = PyUnicode_InternFromString(names[i].text);
        if (*names[i].name == NULL) {
            return -1;
        }
    }
    PyObject *time_module = PyImport_ImportModule("time");
    monotonic_fn = time_module == NULL ? NULL : PyObject_GetAttrString(time_module, "monotonic");
    Py_XDECREF(time_module);
    if (monotonic_fn == NULL) {
        return -1;
    }
    one = PyLong_FromLong(1);
    status_200 = PyLong_FromLong(200);
    post_method = PyBytes_FromString("POST");
    loop_key = PyUnicode_InternFromString("loop");
    empty_args = PyTuple_New(0);
    if (one == NULL || status_200 == NULL || post_method == NULL || loop_key == NULL || empty_args == NULL ||
        PyType_Ready(&IngestType) < 0 || PyType_Ready(&HttpLaneType) < 0 || PyType_Ready(&FastConnectionType) < 0 ||
        PyType_Ready(&CoapLaneType) < 0 || PyType_Ready(&CoapAnswerType) < 0) {
        return -1;
    }
    if (PyModule_AddObjectRef(module, "Ingest", (PyObject *)&IngestType) < 0 ||
        PyModule_AddObjectRef(module, "HttpLane", (PyObject *)&HttpLaneType) < 0 ||
        PyModule_AddObjectRef(module, "CoapLane", (PyObject *)&CoapLaneType) < 0) {
        return -1;
    }
    if (PyModule_AddFunctions(module, lane_functions) < 0) {
        return -1;
    }
    return PyModule_AddObjectRef(module, "FastConnection", (PyObject *)&FastConnectionType);
}
