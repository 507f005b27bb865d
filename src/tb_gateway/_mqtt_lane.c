/* The MQTT lane (mqtt/server.py), built with _speedups.c and _lanes.c into one module.
 *
 * FastMqttConnection is the C base class of MqttConnection: it owns data_received and _settled, and the
 * connection's hot state is its member slots (Python reads and writes them as the same attributes). A read
 * that is nothing but whole plain QoS 1 PUBLISHes (first byte 0x32: no DUP, no retain; no MQTT 5 properties)
 * on the device topics that post (telemetry, attributes, claim), on a connected session with nothing
 * buffered, held, paused or draining, that fits in the pipeline, is posted here: what Session.receive_data,
 * _admit, _publish and the quiet end of _flush do for it. When the head of the ack queue settles, a run of
 * plain successes is acknowledged here in one write: what _settle does on its hot path. Anything else goes,
 * untouched, to MqttConnection._read / _settle / _flush, which stay the reference (tests/test_mqtt_lane.py
 * runs generated reads through both and compares every byte written, record, counter and state).
 */
#include "_speedups.h"

#include <stddef.h>
#include <structmember.h>

#define MAX_TOPICS 16

typedef struct {
    PyObject_HEAD
    PyObject *api, *mqtt, *outcome_type, *delivered, *ticket_type, *when_settled, *connected, *latency, *payload_error;
    PyObject *topics[MAX_TOPICS], *kinds[MAX_TOPICS]; /* the topics that post (bytes) and their record kinds */
    Py_ssize_t ntopics, max_packet, headroom, max_inflight, sample, taken;
} MqttLaneObject;

typedef struct {
    PyObject_HEAD
    PyObject *_lane, *_server, *_api, *_loop, *_transport, *_session, *_acks, *_device, *_codes, *_watching,
        *_backlog, *_downlink, *_drained;
    PyObject *settled; /* self._settled, bound once */
    double _read_at;
    long long _read_ms;
    int _paused, _sampled;
    char _closing, _v5;
} FastMqttObject;

static PyObject *poll_name, *pipeline_name, *state_name, *decoder_name, *buf_name, *failed_name, *queue_name,
    *max_queue_name, *time_name, *last_received_name, *inflight_name, *now_ms_name, *hub_name, *post_name,
    *bad_payload_name, *append_name, *popleft_name, *done_name, *result_name, *then_name, *flush_name,
    *out_name, *read_name, *settle_name, *answer_due_name, *ack_now_name, *write_name, *settled_name,
    *activity_kwnames;

static int
is_none(PyObject *obj)
{
    return obj == NULL || obj == Py_None;
}

/* ------------------------------------------------------------------------------------------------------------
 * The lane: what every connection of one MqttServer shares. */

typedef struct {
    Py_ssize_t kind;  /* index into the lane's topics */
    long packet_id;
    Py_ssize_t payload, payload_size;
} FastPublish;

/* The plain QoS 1 PUBLISH on a posting topic that starts at pos and ends within size: its end; -1 for anything
 * else (incomplete, another packet, properties, an unknown topic, packet id 0, over the size limit) */
static Py_ssize_t
next_publish(const MqttLaneObject *lane, const unsigned char *p, Py_ssize_t size, Py_ssize_t pos, int v5,
             FastPublish *out)
{
    if (size - pos < 2 || p[pos] != 0x32) {
        return -1;
    }
    Py_ssize_t length = 0, i = pos + 1;
    int shift = 0;
    for (;;) { /* the remaining length, as the decoder reads it (mqtt/codec.py Decoder._header) */
        if (i >= size) {
            return -1;
        }
        unsigned char b = p[i++];
        if (b == 0 && shift) {
            return -1;
        }
        length |= (Py_ssize_t)(b & 0x7F) << shift;
        if (b < 0x80) {
            break;
        }
        shift += 7;
        if (shift > 21) {
            return -1;
        }
    }
    if (length > lane->max_packet || length > size - i) {
        return -1;
    }
    Py_ssize_t end = i + length;
    if (end - i < 2) {
        return -1;
    }
    Py_ssize_t topic_size = ((Py_ssize_t)p[i] << 8) | p[i + 1];
    i += 2;
    if (topic_size > end - i) {
        return -1;
    }
    out->kind = -1;
    for (Py_ssize_t k = 0; k < lane->ntopics; k++) {
        PyObject *topic = lane->topics[k];
        if (PyBytes_GET_SIZE(topic) == topic_size && memcmp(PyBytes_AS_STRING(topic), p + i, topic_size) == 0) {
            out->kind = k;
            break;
        }
    }
    i += topic_size;
    if (out->kind < 0 || end - i < 2) {
        return -1;
    }
    out->packet_id = ((long)p[i] << 8) | p[i + 1];
    i += 2;
    if (out->packet_id == 0) {
        return -1;
    }
    if (v5) { /* no properties: a property length of 0 */
        if (i >= end || p[i] != 0) {
            return -1;
        }
        i++;
    }
    out->payload = i;
    out->payload_size = end - i;
    return end;
}

/* How many plain PUBLISHes make up the whole of data: 0 when anything else is in it */
static Py_ssize_t
count_publishes(const MqttLaneObject *lane, const unsigned char *p, Py_ssize_t size, int v5)
{
    Py_ssize_t pos = 0, count = 0;
    FastPublish publish;
    while (pos < size) {
        pos = next_publish(lane, p, size, pos, v5, &publish);
        if (pos < 0) {
            return 0;
        }
        count++;
    }
    return count;
}

static int
mqtt_lane_traverse(MqttLaneObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->api);
    Py_VISIT(self->mqtt);
    Py_VISIT(self->outcome_type);
    Py_VISIT(self->delivered);
    Py_VISIT(self->ticket_type);
    Py_VISIT(self->when_settled);
    Py_VISIT(self->connected);
    Py_VISIT(self->latency);
    Py_VISIT(self->payload_error);
    for (Py_ssize_t k = 0; k < self->ntopics; k++) {
        Py_VISIT(self->topics[k]);
        Py_VISIT(self->kinds[k]);
    }
    return 0;
}

static int
mqtt_lane_clear(MqttLaneObject *self)
{
    Py_CLEAR(self->api);
    Py_CLEAR(self->mqtt);
    Py_CLEAR(self->outcome_type);
    Py_CLEAR(self->delivered);
    Py_CLEAR(self->ticket_type);
    Py_CLEAR(self->when_settled);
    Py_CLEAR(self->connected);
    Py_CLEAR(self->latency);
    Py_CLEAR(self->payload_error);
    for (Py_ssize_t k = 0; k < self->ntopics; k++) {
        Py_CLEAR(self->topics[k]);
        Py_CLEAR(self->kinds[k]);
    }
    self->ntopics = 0;
    return 0;
}

static void
mqtt_lane_dealloc(MqttLaneObject *self)
{
    PyObject_GC_UnTrack(self);
    mqtt_lane_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
mqtt_lane_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *api, *mqtt, *topics, *outcome_type, *delivered, *ticket_type, *when_settled, *connected, *latency,
        *payload_error;
    Py_ssize_t max_packet, headroom, max_inflight, sample;
    if ((kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) ||
        !PyArg_ParseTuple(args, "OOO!O!OO!OOOOnnnn:MqttLane", &api, &mqtt, &PyDict_Type, &topics, &PyType_Type,
                          &outcome_type, &delivered, &PyType_Type, &ticket_type, &when_settled, &connected,
                          &latency, &payload_error, &max_packet, &headroom, &max_inflight, &sample)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "MqttLane takes positional arguments only");
        }
        return NULL;
    }
    if (PyDict_GET_SIZE(topics) > MAX_TOPICS) {
        PyErr_SetString(PyExc_ValueError, "MqttLane: too many topics");
        return NULL;
    }
    MqttLaneObject *self = (MqttLaneObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    Py_ssize_t at = 0;
    PyObject *topic, *kind;
    while (PyDict_Next(topics, &at, &topic, &kind)) {
        if (!PyBytes_CheckExact(topic)) {
            Py_DECREF(self);
            PyErr_SetString(PyExc_TypeError, "MqttLane: topics are bytes");
            return NULL;
        }
        self->topics[self->ntopics] = Py_NewRef(topic);
        self->kinds[self->ntopics] = Py_NewRef(kind);
        self->ntopics++;
    }
    self->api = Py_NewRef(api);
    self->mqtt = Py_NewRef(mqtt);
    self->outcome_type = Py_NewRef(outcome_type);
    self->delivered = Py_NewRef(delivered);
    self->ticket_type = Py_NewRef(ticket_type);
    self->when_settled = Py_NewRef(when_settled);
    self->connected = Py_NewRef(connected);
    self->latency = Py_NewRef(latency);
    self->payload_error = Py_NewRef(payload_error);
    self->max_packet = max_packet;
    self->headroom = headroom;
    self->max_inflight = max_inflight;
    self->sample = sample > 0 ? sample : 1;
    return (PyObject *)self;
}

/* count_publishes, for tests: what the lane would take of a read */
static PyObject *
mqtt_lane_publishes(MqttLaneObject *self, PyObject *args)
{
    const char *data;
    Py_ssize_t size;
    int v5;
    if (!PyArg_ParseTuple(args, "y#p:publishes", &data, &size, &v5)) {
        return NULL;
    }
    return PyLong_FromSsize_t(count_publishes(self, (const unsigned char *)data, size, v5));
}

static PyMethodDef mqtt_lane_methods[] = {
    {"publishes", (PyCFunction)mqtt_lane_publishes, METH_VARARGS,
     "publishes(data, v5): how many plain PUBLISHes the lane would take of this read (0: none of it)"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef mqtt_lane_members[] = {
    {"taken", T_PYSSIZET, offsetof(MqttLaneObject, taken), READONLY, "reads the lane took"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject MqttLaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tb_gateway._speedups.MqttLane",
    .tp_basicsize = sizeof(MqttLaneObject),
    .tp_dealloc = (destructor)mqtt_lane_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)mqtt_lane_traverse,
    .tp_clear = (inquiry)mqtt_lane_clear,
    .tp_methods = mqtt_lane_methods,
    .tp_members = mqtt_lane_members,
    .tp_new = mqtt_lane_new,
    .tp_doc = "What the MQTT lane shares across an MqttServer's connections (mqtt/server.py)",
};

/* ------------------------------------------------------------------------------------------------------------
 * The connection. */

static int
call_method_none(PyObject *obj, PyObject *name)
{
    PyObject *none = PyObject_CallMethodNoArgs(obj, name);
    Py_XDECREF(none);
    return none == NULL ? -1 : 0;
}

/* obj.name as a Py_ssize_t (len() when as_len), -1 with an error; through the call site's attribute cache */
#define attr_size(obj, name, as_len)                                                                           \
    __extension__({                                                                                            \
        PyObject *value_ = GETATTR((obj), (name));                                                             \
        Py_ssize_t size_ = value_ == NULL ? -1 : (as_len) ? PyObject_Length(value_) : PyLong_AsSsize_t(value_); \
        Py_XDECREF(value_);                                                                                    \
        size_;                                                                                                 \
    })
/* future.done(): 1, 0 or -1 */
static int
is_done(PyObject *future)
{
    PyObject *done = PyObject_CallMethodNoArgs(future, done_name);
    if (done == NULL) {
        return -1;
    }
    int is_true = done == Py_True;
    Py_DECREF(done);
    return is_true;
}

/* self._watching = head; when_settled(head, self._settled) (a pipeline ticket's one callback set directly) */
static int
watch(FastMqttObject *self, MqttLaneObject *lane, PyObject *head)
{
    Py_XSETREF(self->_watching, Py_NewRef(head));
    if (Py_IS_TYPE(head, (PyTypeObject *)lane->ticket_type)) {
        PyObject *then = GETATTR(head, then_name);
        if (then == NULL) {
            return -1;
        }
        int free = then == Py_None;
        Py_DECREF(then);
        int done = free ? is_done(head) : 1;
        if (done < 0) {
            return -1;
        }
        if (!done) {
            return SETATTR(head, then_name, self->settled);
        }
    }
    PyObject *none = PyObject_CallFunctionObjArgs(lane->when_settled, head, self->settled, NULL);
    Py_XDECREF(none);
    return none == NULL ? -1 : 0;
}

/* the session is CONNECTED, its decoder holds nothing and has not failed: 1, 0 or -1 */
static int
session_ready(PyObject *session, MqttLaneObject *lane)
{
    PyObject *state = GETATTR(session, state_name);
    if (state == NULL) {
        return -1;
    }
    Py_DECREF(state); /* an enum member: the class keeps it */
    if (state != lane->connected) {
        return 0;
    }
    PyObject *decoder = GETATTR(session, decoder_name);
    if (decoder == NULL) {
        return -1;
    }
    Py_ssize_t buffered = attr_size(decoder, buf_name, 1);
    PyObject *failed = buffered != 0 ? NULL : GETATTR(decoder, failed_name);
    Py_DECREF(decoder);
    if (failed == NULL) {
        return buffered < 0 ? -1 : 0;
    }
    int ready = failed == Py_None;
    Py_DECREF(failed);
    return ready;
}

/* the pipeline's queue has room for count more: 1, 0 or -1 (Pipeline.has_room) */
static int
has_room(PyObject *api, Py_ssize_t count)
{
    PyObject *pipeline = GETATTR(api, pipeline_name);
    if (pipeline == NULL) {
        return -1;
    }
    Py_ssize_t queued = attr_size(pipeline, queue_name, 1);
    Py_ssize_t limit = queued < 0 ? -1 : attr_size(pipeline, max_queue_name, 0);
    Py_DECREF(pipeline);
    if (limit < 0 && PyErr_Occurred()) {
        return -1;
    }
    return queued + count <= limit;
}

/* session.inflight += delta; the new value, -1 with an error */
static Py_ssize_t
add_inflight(PyObject *session, Py_ssize_t delta)
{
    Py_ssize_t inflight = attr_size(session, inflight_name, 0);
    if (inflight == -1 && PyErr_Occurred()) {
        return -1;
    }
    PyObject *value = PyLong_FromSsize_t(inflight + delta);
    int rc = value == NULL ? -1 : SETATTR(session, inflight_name, value);
    Py_XDECREF(value);
    return rc < 0 ? -1 : inflight + delta;
}

/* The read's wall-clock time, as _read / _publish take it: a new reading for every read that reports activity,
 * else when the loop's time moved; the hub hears of the activity (Downlink.activity's hot path in C). */
static PyObject *
read_time(FastMqttObject *self, double now)
{
    int activity = !is_none(self->_downlink);
    if (activity || now != self->_read_at) {
        PyObject *ms = PyObject_CallMethodNoArgs(self->_api, now_ms_name);
        long long value = ms == NULL ? -1 : PyLong_AsLongLong(ms);
        Py_XDECREF(ms);
        if (value == -1 && PyErr_Occurred()) {
            return NULL;
        }
        self->_read_at = now;
        self->_read_ms = value;
    }
    PyObject *read_ms = PyLong_FromLongLong(self->_read_ms);
    if (read_ms == NULL || !activity) {
        return read_ms;
    }
    PyObject *hub = GETATTR(self->_downlink, hub_name);
    int rc = hub == NULL ? -1 : mark_active(hub, self->_device, ((MqttLaneObject *)self->_lane)->mqtt, read_ms);
    Py_XDECREF(hub);
    if (rc < 0) {
        Py_DECREF(read_ms);
        return NULL;
    }
    return read_ms;
}

/* Post one PUBLISH and queue its answer, as _publish does; 0 or -1 */
static int
post_one(FastMqttObject *self, MqttLaneObject *lane, PyObject *post, const char *bytes, const FastPublish *publish,
         PyObject *read_ms, PyObject *now)
{
    PyObject *packet_id = PyLong_FromLong(publish->packet_id);
    PyObject *payload = packet_id == NULL ? NULL : PyBytes_FromStringAndSize(bytes + publish->payload,
                                                                             publish->payload_size);
    if (payload == NULL) {
        Py_XDECREF(packet_id);
        return -1;
    }
    PyObject *seen = is_none(self->_downlink) ? Py_False : Py_True;
    PyObject *args[] = {self->_device, lane->kinds[publish->kind], payload, lane->mqtt, read_ms, seen};
    PyObject *answer = PyObject_Vectorcall(post, args, 5, activity_kwnames);
    Py_DECREF(payload);
    int rc = -1;
    if (answer == NULL) {
        if (PyErr_ExceptionMatches(lane->payload_error)) { /* counted and logged by post */
            PyErr_Clear();
            PyObject *qos = PyLong_FromLong(1);
            PyObject *none = qos == NULL ? NULL
                                         : PyObject_CallMethodObjArgs((PyObject *)self, bad_payload_name, packet_id,
                                                                      qos, now, NULL);
            Py_XDECREF(qos);
            rc = none == NULL ? -1 : 0;
            Py_XDECREF(none);
        }
        Py_DECREF(packet_id);
        return rc;
    }
    if (PyObject_TypeCheck(answer, (PyTypeObject *)lane->outcome_type)) { /* refused at once: post counted it */
        Py_SETREF(answer, PyObject_GetItem(self->_codes, answer));
    }
    PyObject *entry = answer == NULL ? NULL : PyTuple_Pack(3, packet_id, answer, now);
    PyObject *none = entry == NULL ? NULL : PyObject_CallMethodOneArg(self->_acks, append_name, entry);
    rc = none == NULL ? -1 : 0;
    Py_XDECREF(none);
    Py_XDECREF(entry);
    Py_XDECREF(answer);
    Py_DECREF(packet_id);
    return rc;
}

/* After the posts: watch the head of the ack queue; when anything more than that is due (an answer ready, a
 * close, bytes queued, a full window or pipeline), _flush. 0 or -1. */
static int
after_posts(FastMqttObject *self, MqttLaneObject *lane, Py_ssize_t inflight)
{
    int flush = self->_closing || inflight >= lane->max_inflight;
    Py_ssize_t waiting = PyObject_Length(self->_acks);
    if (waiting < 0) {
        return -1;
    }
    if (!flush && waiting > 0) {
        PyObject *entry = PySequence_GetItem(self->_acks, 0);
        if (entry == NULL) {
            return -1;
        }
        PyObject *head = PyTuple_Check(entry) && PyTuple_GET_SIZE(entry) == 3 ? PyTuple_GET_ITEM(entry, 1) : NULL;
        int done = head == NULL || PyLong_CheckExact(head) ? 1 : is_done(head);
        int rc = done || head == self->_watching ? 0 : watch(self, lane, head);
        Py_DECREF(entry);
        if (done < 0 || rc < 0) {
            return -1;
        }
        flush = done;
    }
    if (!flush) {
        Py_ssize_t queued = attr_size(self->_session, out_name, 1);
        int room = queued < 0 ? -1 : has_room(self->_api, lane->headroom);
        if (room < 0) {
            return -1;
        }
        flush = queued > 0 || !room;
    }
    return flush ? call_method_none((PyObject *)self, flush_name) : 0;
}

/* 1: the lane took the read; 0: leave it to _read (nothing was changed); -1: an error */
static int
fast_read(FastMqttObject *self, MqttLaneObject *lane, PyObject *data)
{
    if (!PyBytes_CheckExact(data) || is_none(self->_transport) || self->_closing || self->_paused ||
        !is_none(self->_backlog) || !is_none(self->_drained) || is_none(self->_device) || is_none(self->_acks) ||
        is_none(self->_session) || is_none(self->_loop) || is_none(self->_codes)) {
        return 0;
    }
    const char *bytes = PyBytes_AS_STRING(data);
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    Py_ssize_t count = count_publishes(lane, (const unsigned char *)bytes, size, self->_v5);
    if (count == 0) {
        return 0;
    }
    int ready = session_ready(self->_session, lane);
    if (ready > 0) {
        ready = has_room(self->_api, count + lane->headroom);
    }
    if (ready <= 0) {
        return ready;
    }
    /* taken: from here on the read is the lane's */
    lane->taken++;
    PyObject *now = PyObject_CallMethodNoArgs(self->_loop, time_name);
    double when = now == NULL ? -1.0 : PyFloat_AsDouble(now);
    if (now == NULL || (when == -1.0 && PyErr_Occurred()) ||
        SETATTR(self->_session, last_received_name, now) < 0) {
        Py_XDECREF(now);
        return -1;
    }
    Py_ssize_t inflight = add_inflight(self->_session, count);
    PyObject *read_ms = inflight < 0 ? NULL : read_time(self, when);
    PyObject *post = read_ms == NULL ? NULL : GETATTR(self->_api, post_name);
    int rc = post == NULL ? -1 : 0;
    FastPublish publish;
    for (Py_ssize_t pos = 0; rc == 0 && pos < size && !self->_closing;) {
        pos = next_publish(lane, (const unsigned char *)bytes, size, pos, self->_v5, &publish);
        rc = post_one(self, lane, post, bytes, &publish, read_ms, now);
    }
    if (rc == 0) {
        rc = after_posts(self, lane, inflight);
    }
    Py_XDECREF(post);
    Py_XDECREF(read_ms);
    Py_DECREF(now);
    return rc < 0 ? -1 : 1;
}

static PyObject *
fast_mqtt_data_received(FastMqttObject *self, PyObject *data)
{
    /* answers whose batch is durable go out now, not at the end of this pass */
    PyObject *pipeline = is_none(self->_api) ? NULL : GETATTR(self->_api, pipeline_name);
    if (pipeline == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_RuntimeError, "FastMqttConnection: no api");
        }
        return NULL;
    }
    int rc = call_method_none(pipeline, poll_name);
    Py_DECREF(pipeline);
    if (rc < 0) {
        return NULL;
    }
    Py_INCREF(self);
    PyObject *lane = Py_NewRef(self->_lane);
    int taken = is_none(lane) ? 0 : fast_read(self, (MqttLaneObject *)lane, data);
    PyObject *result = taken == 0 ? PyObject_CallMethodOneArg((PyObject *)self, read_name, data)
                                  : taken > 0 ? Py_NewRef(Py_None) : NULL;
    Py_DECREF(lane);
    Py_DECREF(self);
    return result;
}

/* Pop the run of plain successes at the head of the ack queue (AckQueue.pop_delivered): their packet ids in
 * ids, the received_at of the last; how many, -1 with an error */
static Py_ssize_t
pop_delivered(FastMqttObject *self, PyObject *delivered, PyObject *ids, double *received_at)
{
    Py_ssize_t count = 0;
    for (;;) {
        Py_ssize_t waiting = PyObject_Length(self->_acks);
        if (waiting <= 0) {
            return waiting < 0 ? -1 : count;
        }
        PyObject *entry = PySequence_GetItem(self->_acks, 0);
        if (entry == NULL) {
            return -1;
        }
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 3) {
            Py_DECREF(entry);
            return count;
        }
        PyObject *id = PyTuple_GET_ITEM(entry, 0), *answer = PyTuple_GET_ITEM(entry, 1);
        long packet_id = PyLong_AsLong(id);
        int plain = 0;
        if (packet_id > 0 && packet_id <= 0xFFFF) {
            if (PyLong_CheckExact(answer)) {
                plain = PyLong_AsLong(answer) == 0;
            }
            else if ((plain = is_done(answer)) > 0) {
                PyObject *result = PyObject_CallMethodNoArgs(answer, result_name);
                plain = result == NULL ? -1 : result == delivered;
                Py_XDECREF(result);
            }
        }
        double at = plain > 0 ? PyFloat_AsDouble(PyTuple_GET_ITEM(entry, 2)) : 0.0;
        Py_DECREF(entry);
        if (plain < 0 || PyErr_Occurred()) {
            return -1;
        }
        if (!plain) {
            return count;
        }
        PyObject *popped = PyObject_CallMethodNoArgs(self->_acks, popleft_name);
        if (popped == NULL || PyList_Append(ids, id) < 0) {
            Py_XDECREF(popped);
            return -1;
        }
        Py_DECREF(popped);
        *received_at = at;
        count++;
    }
}

/* The watched head of the ack queue settled. A run of plain successes is due and nothing else, on a connected
 * session that reads and has no bytes queued: answer it in one write, and watch the next head. Anything else:
 * _settle, or _answer_due and _flush as _settle would. */
static PyObject *
fast_mqtt_settled(FastMqttObject *self, PyObject *future)
{
    if (future != self->_watching) {
        Py_RETURN_NONE;
    }
    MqttLaneObject *lane = (MqttLaneObject *)self->_lane;
    int plain = !is_none((PyObject *)lane) && !self->_paused && !is_none(self->_transport) &&
                is_none(self->_drained) && !is_none(self->_acks) && !is_none(self->_session);
    if (plain) {
        PyObject *state = GETATTR(self->_session, state_name);
        if (state == NULL) {
            return NULL;
        }
        Py_DECREF(state);
        plain = state == lane->connected;
    }
    if (!plain) {
        return PyObject_CallMethodOneArg((PyObject *)self, settle_name, future);
    }
    Py_INCREF(self);
    Py_INCREF(lane);
    Py_XSETREF(self->_watching, Py_NewRef(Py_None));
    PyObject *result = NULL, *ids = PyList_New(0), *data = NULL, *head = NULL, *none = NULL;
    double received_at = -1.0;
    Py_ssize_t count = ids == NULL ? -1 : pop_delivered(self, lane->delivered, ids, &received_at);
    if (count < 0) {
        goto done;
    }
    Py_ssize_t waiting = PyObject_Length(self->_acks);
    if (waiting < 0) {
        goto done;
    }
    if (waiting > 0) {
        PyObject *entry = PySequence_GetItem(self->_acks, 0);
        if (entry == NULL) {
            goto done;
        }
        head = PyTuple_Check(entry) && PyTuple_GET_SIZE(entry) == 3 ? Py_NewRef(PyTuple_GET_ITEM(entry, 1)) : NULL;
        Py_DECREF(entry);
        int due = head == NULL || PyLong_CheckExact(head) ? 1 : is_done(head);
        if (due < 0) {
            goto done;
        }
        if (due) { /* more than plain successes is due: the general way */
            PyObject *at = PyFloat_FromDouble(received_at);
            none = at == NULL ? NULL
                              : PyObject_CallMethodObjArgs((PyObject *)self, answer_due_name, ids, at, NULL);
            Py_XDECREF(at);
            if (none == NULL || call_method_none((PyObject *)self, flush_name) < 0) {
                goto done;
            }
            result = Py_NewRef(Py_None);
            goto done;
        }
    }
    if (count > 0) {
        self->_sampled += (int)count;
        if (self->_sampled >= lane->sample) {
            self->_sampled = 0;
            PyObject *now = PyObject_CallMethodNoArgs(self->_loop, time_name);
            double seconds = now == NULL ? 0.0 : PyFloat_AsDouble(now) - received_at;
            Py_XDECREF(now);
            if (now == NULL || PyErr_Occurred() || observe_seconds(lane->latency, seconds) < 0) {
                goto done;
            }
        }
        Py_ssize_t queued = attr_size(self->_session, out_name, 1);
        if (queued < 0) {
            goto done;
        }
        if (queued > 0) { /* what was queued before goes first: Session.acknowledge_delivered_now */
            data = PyObject_CallMethodOneArg(self->_session, ack_now_name, ids);
        }
        else {
            if (add_inflight(self->_session, -count) == -1 && PyErr_Occurred()) {
                goto done;
            }
            data = PyBytes_FromStringAndSize(NULL, 4 * count); /* PUBACK 0x4002_<id> each (codec.pubacks) */
            if (data != NULL) {
                unsigned char *p = (unsigned char *)PyBytes_AS_STRING(data);
                for (Py_ssize_t k = 0; k < count; k++) {
                    long packet_id = PyLong_AsLong(PyList_GET_ITEM(ids, k));
                    p[4 * k] = 0x40;
                    p[4 * k + 1] = 0x02;
                    p[4 * k + 2] = (unsigned char)(packet_id >> 8);
                    p[4 * k + 3] = (unsigned char)packet_id;
                }
            }
        }
        none = data == NULL ? NULL : PyObject_CallMethodOneArg(self->_transport, write_name, data);
        if (none == NULL) {
            goto done;
        }
    }
    if (head != NULL && watch(self, lane, head) < 0) {
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(ids);
    Py_XDECREF(data);
    Py_XDECREF(head);
    Py_XDECREF(none);
    Py_DECREF(lane);
    Py_DECREF(self);
    return result;
}

static int
fast_mqtt_traverse(FastMqttObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->_lane);
    Py_VISIT(self->_server);
    Py_VISIT(self->_api);
    Py_VISIT(self->_loop);
    Py_VISIT(self->_transport);
    Py_VISIT(self->_session);
    Py_VISIT(self->_acks);
    Py_VISIT(self->_device);
    Py_VISIT(self->_codes);
    Py_VISIT(self->_watching);
    Py_VISIT(self->_backlog);
    Py_VISIT(self->_downlink);
    Py_VISIT(self->_drained);
    Py_VISIT(self->settled);
    return 0;
}

static int
fast_mqtt_clear(FastMqttObject *self)
{
    Py_CLEAR(self->_lane);
    Py_CLEAR(self->_server);
    Py_CLEAR(self->_api);
    Py_CLEAR(self->_loop);
    Py_CLEAR(self->_transport);
    Py_CLEAR(self->_session);
    Py_CLEAR(self->_acks);
    Py_CLEAR(self->_device);
    Py_CLEAR(self->_codes);
    Py_CLEAR(self->_watching);
    Py_CLEAR(self->_backlog);
    Py_CLEAR(self->_downlink);
    Py_CLEAR(self->_drained);
    Py_CLEAR(self->settled);
    return 0;
}

static void
fast_mqtt_dealloc(FastMqttObject *self)
{
    PyObject_GC_UnTrack(self);
    fast_mqtt_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self); /* a subclass's instance: subtype_dealloc releases its type */
}

static PyObject *
fast_mqtt_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    FastMqttObject *self = (FastMqttObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->_read_at = -1.0;
    self->settled = PyObject_GetAttr((PyObject *)self, settled_name); /* bound once */
    if (self->settled == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyMethodDef fast_mqtt_methods[] = {
    {"data_received", (PyCFunction)fast_mqtt_data_received, METH_O,
     "asyncio.Protocol.data_received: the MQTT lane, else MqttConnection._read"},
    {"_settled", (PyCFunction)fast_mqtt_settled, METH_O,
     "the watched head of the ack queue settled: its run of PUBACKs, else MqttConnection._settle"},
    {NULL, NULL, 0, NULL},
};

#define OBJ(field) {#field, T_OBJECT, offsetof(FastMqttObject, field), 0, NULL}
static PyMemberDef fast_mqtt_members[] = {
    OBJ(_lane),     OBJ(_server),  OBJ(_api),     OBJ(_loop),      OBJ(_transport), OBJ(_session), OBJ(_acks),
    OBJ(_device),   OBJ(_codes),   OBJ(_watching), OBJ(_backlog),  OBJ(_downlink),  OBJ(_drained),
    {"_read_at", T_DOUBLE, offsetof(FastMqttObject, _read_at), 0, NULL},
    {"_read_ms", T_LONGLONG, offsetof(FastMqttObject, _read_ms), 0, NULL},
    {"_paused", T_INT, offsetof(FastMqttObject, _paused), 0, NULL},
    {"_sampled", T_INT, offsetof(FastMqttObject, _sampled), 0, NULL},
    {"_closing", T_BOOL, offsetof(FastMqttObject, _closing), 0, NULL},
    {"_v5", T_BOOL, offsetof(FastMqttObject, _v5), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};
#undef OBJ

static PyTypeObject FastMqttType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tb_gateway._speedups.FastMqttConnection",
    .tp_basicsize = sizeof(FastMqttObject),
    .tp_dealloc = (destructor)fast_mqtt_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)fast_mqtt_traverse,
    .tp_clear = (inquiry)fast_mqtt_clear,
    .tp_methods = fast_mqtt_methods,
    .tp_members = fast_mqtt_members,
    .tp_new = fast_mqtt_new,
    .tp_doc = "The C base of mqtt/server.py's MqttConnection: the MQTT lane and its hot state",
};

int
mqtt_lane_init(PyObject *module)
{
    struct {
        PyObject **name;
        const char *text;
    } names[] = {
        {&poll_name, "poll"},           {&pipeline_name, "pipeline"},     {&state_name, "state"},
        {&decoder_name, "_decoder"},    {&buf_name, "_buf"},              {&failed_name, "_failed"},
        {&queue_name, "_queue"},        {&max_queue_name, "_max_queue"},  {&time_name, "time"},
        {&last_received_name, "_last_received"}, {&inflight_name, "inflight"}, {&now_ms_name, "now_ms"},
        {&hub_name, "_hub"},            {&post_name, "post"},             {&bad_payload_name, "_bad_payload"},
        {&append_name, "append"},       {&popleft_name, "popleft"},       {&done_name, "done"},
        {&result_name, "result"},       {&then_name, "then"},             {&flush_name, "_flush"},
        {&out_name, "_out"},            {&read_name, "_read"},            {&settle_name, "_settle"},
        {&answer_due_name, "_answer_due"}, {&ack_now_name, "acknowledge_delivered_now"},
        {&write_name, "write"},         {&settled_name, "_settled"},
    };
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        *names[i].name = PyUnicode_InternFromString(names[i].text);
        if (*names[i].name == NULL) {
            return -1;
        }
    }
    activity_kwnames = Py_BuildValue("(s)", "activity_seen");
    if (activity_kwnames == NULL || PyType_Ready(&MqttLaneType) < 0 || PyType_Ready(&FastMqttType) < 0) {
        return -1;
    }
    if (PyModule_AddObjectRef(module, "MqttLane", (PyObject *)&MqttLaneType) < 0) {
        return -1;
    }
    return PyModule_AddObjectRef(module, "FastMqttConnection", (PyObject *)&FastMqttType);
}
