/* The Kafka sink's per-record work in C (sinks/kafka.py; docs/kafka-records.md is the record format).
 *
 * At 25k records/s into Kafka the gateway's core was 90% busy, most of it in Python per record: encoding
 * (two orjson calls, a BLAKE2b object, enum properties, a dict and a header list: ~4.4 µs), a
 * functools.partial per record as its delivery callback, and in the poll thread a Python frame, a lock and a
 * histogram lock per delivery report. Here:
 *
 * - kafka_encode(record) -> (key, value, headers) | None: the same bytes as kafka_records.encode (one orjson
 *   call for the values, the rest written here, BLAKE2b-128 over the same content); None for anything
 *   unusual (a string that is not str, a ts that is not a plain int or does not fit 64 bits), which the
 *   caller then encodes in Python.
 * - KafkaBatch: one deliver() call's outcomes and future (kafka.py's _Batch); DeliveryReport: the callable
 *   librdkafka's delivery report calls for one record, in the poll thread, holding the GIL: a delivered
 *   record is settled here, anything else asks the sink (on_error) what it means.
 * - kafka_produce(produce, records, topics, batch, encode, refusals) -> [(index, exception)]: the produce
 *   loop, with the exceptions in `refusals` (BufferError, KafkaException) handed back for the sink to judge.
 */
#include "_speedups.h"

#include <string.h>
#include <time.h>

/* ---- BLAKE2b (RFC 7693), unkeyed, 16-byte digest: hashlib.blake2b(content, digest_size=16) ---- */

static const uint64_t blake2b_iv[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

static const uint8_t blake2b_sigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

static inline uint64_t
rotr64(uint64_t x, unsigned n)
{
    return (x >> n) | (x << (64 - n));
}

static inline uint64_t
load64_le(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) {
        v = (v << 8) | p[i];
    }
    return v;
}

#define B2B_G(a, b, c, d, x, y)                                                                                      \
    do {                                                                                                           \
        v[a] = v[a] + v[b] + (x);                                                                                  \
        v[d] = rotr64(v[d] ^ v[a], 32);                                                                            \
        v[c] = v[c] + v[d];                                                                                        \
        v[b] = rotr64(v[b] ^ v[c], 24);                                                                            \
        v[a] = v[a] + v[b] + (y);                                                                                  \
        v[d] = rotr64(v[d] ^ v[a], 16);                                                                            \
        v[c] = v[c] + v[d];                                                                                        \
        v[b] = rotr64(v[b] ^ v[c], 63);                                                                            \
    } while (0)

/* one 128-byte block; `bytes` is the count of message bytes up to and including this block */
static void
blake2b_compress(uint64_t h[8], const uint8_t block[128], uint64_t bytes, int last)
{
    uint64_t v[16], m[16];
    for (int i = 0; i < 16; i++) {
        m[i] = load64_le(block + 8 * i);
    }
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = blake2b_iv[i];
    }
    v[12] ^= bytes; /* the high 64 bits of the counter stay 0: a record is never 2^64 bytes */
    if (last) {
        v[14] = ~v[14];
    }
    for (int r = 0; r < 12; r++) {
        const uint8_t *s = blake2b_sigma[r];
        B2B_G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        B2B_G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        B2B_G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        B2B_G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        B2B_G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        B2B_G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        B2B_G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        B2B_G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) {
        h[i] ^= v[i] ^ v[i + 8];
    }
}

/* the 32 lower-case hex digits of BLAKE2b-128(data) into hex[32] */
static void
blake2b_128_hex(const uint8_t *data, size_t size, char hex[32])
{
    uint64_t h[8];
    memcpy(h, blake2b_iv, sizeof h);
    h[0] ^= 0x01010000ULL ^ 16; /* fanout 1, depth 1, no key, 16-byte digest */
    size_t done = 0;
    while (size - done > 128) { /* every block but the last, which is compressed as the final one */
        blake2b_compress(h, data + done, done + 128, 0);
        done += 128;
    }
    uint8_t last[128] = {0};
    memcpy(last, data + done, size - done);
    blake2b_compress(h, last, size, 1);
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 16; i++) {
        uint8_t byte = (uint8_t)(h[i / 8] >> (8 * (i % 8)));
        hex[2 * i] = digits[byte >> 4];
        hex[2 * i + 1] = digits[byte & 15];
    }
}

/* ---- JSON text as orjson writes it: strings escaped like orjson, integers in decimal ---- */

typedef struct {
    const char *data;
    Py_ssize_t size;
} Text;

/* the escaped length of a UTF-8 string, quotes included */
static Py_ssize_t
json_string_size(Text s)
{
    Py_ssize_t n = 2;
    for (Py_ssize_t i = 0; i < s.size; i++) {
        unsigned char c = (unsigned char)s.data[i];
        if (c == '"' || c == '\\' || c == '\b' || c == '\f' || c == '\n' || c == '\r' || c == '\t') {
            n += 2;
        }
        else if (c < 0x20) {
            n += 6;
        }
        else {
            n += 1;
        }
    }
    return n;
}

static char *
json_string_write(char *out, Text s)
{
    static const char digits[] = "0123456789abcdef";
    *out++ = '"';
    for (Py_ssize_t i = 0; i < s.size; i++) {
        unsigned char c = (unsigned char)s.data[i];
        char brief = 0;
        switch (c) {
        case '"': brief = '"'; break;
        case '\\': brief = '\\'; break;
        case '\b': brief = 'b'; break;
        case '\f': brief = 'f'; break;
        case '\n': brief = 'n'; break;
        case '\r': brief = 'r'; break;
        case '\t': brief = 't'; break;
        default: break;
        }
        if (brief) {
            *out++ = '\\';
            *out++ = brief;
        }
        else if (c < 0x20) {
            memcpy(out, "\\u00", 4);
            out[4] = digits[c >> 4];
            out[5] = digits[c & 15];
            out += 6;
        }
        else {
            *out++ = (char)c;
        }
    }
    *out++ = '"';
    return out;
}

static char *
put(char *out, const char *text, size_t size)
{
    memcpy(out, text, size);
    return out + size;
}

#define PUT(out, literal) put((out), (literal), sizeof(literal) - 1)

/* a str's UTF-8 (not a copy); 0 when it is not a str or cannot be encoded (a lone surrogate) */
static int
text_of(PyObject *obj, Text *text)
{
    if (obj == NULL || !PyUnicode_Check(obj)) {
        return 0;
    }
    text->data = PyUnicode_AsUTF8AndSize(obj, &text->size);
    if (text->data == NULL) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* a plain int that fits a signed 64-bit integer, in decimal; 0 otherwise */
static int
decimal_of(PyObject *obj, char out[24], Py_ssize_t *size)
{
    if (obj == NULL || !PyLong_CheckExact(obj)) {
        return 0;
    }
    int overflow = 0;
    long long value = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow || (value == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    *size = snprintf(out, 24, "%lld", value);
    return 1;
}

static PyObject *dumps_fn; /* orjson.dumps */
static PyObject *device_name, *id_name, *name_name, *type_name, *kind_name, *ts_name, *values_name;
static PyObject *transport_name, *received_at_name;
static PyObject *schema_header; /* ("tb-schema", b"1"), shared by every record */
static PyObject *kind_header_name, *transport_header_name, *msg_id_header_name;

/* (key, value, headers) as kafka_records.encode makes them; None: encode it in Python; NULL: an error */
static PyObject *
encode_record(PyObject *record)
{
    PyObject *device = NULL, *id = NULL, *name = NULL, *type = NULL, *kind = NULL, *ts = NULL, *values = NULL;
    PyObject *transport = NULL, *received_at = NULL, *dumped = NULL, *result = NULL;
    char *content = NULL;
    Text t_id, t_name, t_type, t_kind, t_transport;
    char ts_text[24], received_text[24];
    Py_ssize_t ts_size, received_size;

    device = GETATTR(record, device_name);
    kind = device == NULL ? NULL : GETATTR(record, kind_name);
    ts = kind == NULL ? NULL : GETATTR(record, ts_name);
    values = ts == NULL ? NULL : GETATTR(record, values_name);
    transport = values == NULL ? NULL : GETATTR(record, transport_name);
    received_at = transport == NULL ? NULL : GETATTR(record, received_at_name);
    id = received_at == NULL ? NULL : GETATTR(device, id_name);
    name = id == NULL ? NULL : GETATTR(device, name_name);
    type = name == NULL ? NULL : GETATTR(device, type_name);
    if (type == NULL) {
        goto done;
    }
    if (!text_of(id, &t_id) || !text_of(name, &t_name) || !text_of(type, &t_type) || !text_of(kind, &t_kind) ||
        !text_of(transport, &t_transport) || !decimal_of(ts, ts_text, &ts_size) ||
        !decimal_of(received_at, received_text, &received_size) || !PyDict_CheckExact(values)) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    dumped = PyObject_CallOneArg(dumps_fn, values);
    if (dumped == NULL) {
        goto done;
    }
    Text v = {PyBytes_AS_STRING(dumped), PyBytes_GET_SIZE(dumped)};
    Py_ssize_t id_size = json_string_size(t_id), kind_size = json_string_size(t_kind);
    Py_ssize_t transport_size = json_string_size(t_transport);

    /* the msg_id's content: orjson.dumps([id, kind, ts, received_at, transport, values]) */
    Py_ssize_t content_size = 1 + id_size + 1 + kind_size + 1 + ts_size + 1 + received_size + 1 + transport_size +
                              1 + v.size + 1;
    content = PyMem_Malloc((size_t)content_size);
    if (content == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    char *out = content;
    *out++ = '[';
    out = json_string_write(out, t_id);
    *out++ = ',';
    out = json_string_write(out, t_kind);
    *out++ = ',';
    out = put(out, ts_text, (size_t)ts_size);
    *out++ = ',';
    out = put(out, received_text, (size_t)received_size);
    *out++ = ',';
    out = json_string_write(out, t_transport);
    *out++ = ',';
    out = put(out, v.data, (size_t)v.size);
    *out++ = ']';
    char hex[32];
    blake2b_128_hex((const uint8_t *)content, (size_t)(out - content), hex);

    /* the value: {"schema":1,"msg_id":..., then Record.to_dict()'s fields in its order} */
    static const char schema_part[] = "{\"schema\":1,\"msg_id\":\"";
    Py_ssize_t value_size = (Py_ssize_t)sizeof schema_part - 1 + 32 + 1 + (Py_ssize_t)sizeof ",\"device\":" - 1 +
                            json_string_size(t_name) + (Py_ssize_t)sizeof ",\"device_id\":" - 1 + id_size +
                            (Py_ssize_t)sizeof ",\"device_type\":" - 1 + json_string_size(t_type) +
                            (Py_ssize_t)sizeof ",\"kind\":" - 1 + kind_size + (Py_ssize_t)sizeof ",\"ts\":" - 1 +
                            ts_size + (Py_ssize_t)sizeof ",\"values\":" - 1 + v.size +
                            (Py_ssize_t)sizeof ",\"transport\":" - 1 + transport_size +
                            (Py_ssize_t)sizeof ",\"received_at\":" - 1 + received_size + 1;
    PyObject *parts[3] = {NULL, NULL, NULL};
    parts[0] = PyBytes_FromStringAndSize(t_id.data, t_id.size);
    parts[1] = PyBytes_FromStringAndSize(NULL, value_size);
    if (parts[1] != NULL) {
        out = PyBytes_AS_STRING(parts[1]);
        out = PUT(out, "{\"schema\":1,\"msg_id\":\"");
        out = put(out, hex, 32);
        out = PUT(out, "\",\"device\":");
        out = json_string_write(out, t_name);
        out = PUT(out, ",\"device_id\":");
        out = json_string_write(out, t_id);
        out = PUT(out, ",\"device_type\":");
        out = json_string_write(out, t_type);
        out = PUT(out, ",\"kind\":");
        out = json_string_write(out, t_kind);
        out = PUT(out, ",\"ts\":");
        out = put(out, ts_text, (size_t)ts_size);
        out = PUT(out, ",\"values\":");
        out = put(out, v.data, (size_t)v.size);
        out = PUT(out, ",\"transport\":");
        out = json_string_write(out, t_transport);
        out = PUT(out, ",\"received_at\":");
        out = put(out, received_text, (size_t)received_size);
        *out++ = '}';
        assert(out == PyBytes_AS_STRING(parts[1]) + value_size);
    }
    PyObject *kind_header[2] = {Py_NewRef(kind_header_name), PyBytes_FromStringAndSize(t_kind.data, t_kind.size)};
    PyObject *transport_header[2] = {Py_NewRef(transport_header_name),
                                     PyBytes_FromStringAndSize(t_transport.data, t_transport.size)};
    PyObject *msg_id_header[2] = {Py_NewRef(msg_id_header_name), PyBytes_FromStringAndSize(hex, 32)};
    PyObject *headers[4] = {Py_NewRef(schema_header), tuple_steal(2, kind_header), tuple_steal(2, transport_header),
                            tuple_steal(2, msg_id_header)};
    PyObject *header_list = PyList_New(4);
    if (header_list == NULL) {
        for (int i = 0; i < 4; i++) {
            Py_XDECREF(headers[i]);
        }
    }
    else {
        for (int i = 0; i < 4; i++) {
            if (headers[i] == NULL) {
                Py_CLEAR(header_list); /* releases the items set so far */
                for (int j = i + 1; j < 4; j++) {
                    Py_XDECREF(headers[j]);
                }
                break;
            }
            PyList_SET_ITEM(header_list, i, headers[i]);
        }
    }
    parts[2] = header_list;
    result = tuple_steal(3, parts);

done:
    PyMem_Free(content);
    Py_XDECREF(dumped);
    Py_XDECREF(device);
    Py_XDECREF(id);
    Py_XDECREF(name);
    Py_XDECREF(type);
    Py_XDECREF(kind);
    Py_XDECREF(ts);
    Py_XDECREF(values);
    Py_XDECREF(transport);
    Py_XDECREF(received_at);
    return result;
}

static PyObject *
speedups_kafka_encode(PyObject *Py_UNUSED(self), PyObject *record)
{
    return encode_record(record);
}

/* ---- KafkaBatch and DeliveryReport ---- */

static double
monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.monotonic()'s clock */
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

typedef struct {
    PyObject_HEAD
    PyObject *loop;
    PyObject *resolve;   /* resolve(future): sets its result unless it is done */
    PyObject *future;
    PyObject *outcomes;  /* list, one outcome per record, SINK_FAILED until settled */
    PyObject *delivered; /* Outcome.DELIVERED */
    PyObject *latency;   /* histogram child: produce -> acknowledgement, per record; or None */
    PyObject *on_error;  /* on_error(index, err, msg) -> outcome, for a failed delivery report */
    Py_ssize_t remaining;
    double started;
} KafkaBatchObject;

static PyObject *call_soon_threadsafe_name;

static int
batch_settle(KafkaBatchObject *batch, Py_ssize_t index, PyObject *outcome)
{
    if (index < 0 || index >= PyList_GET_SIZE(batch->outcomes)) {
        PyErr_SetString(PyExc_IndexError, "no such record in the batch");
        return -1;
    }
    PyObject *old = PyList_GET_ITEM(batch->outcomes, index);
    PyList_SET_ITEM(batch->outcomes, index, Py_NewRef(outcome));
    Py_DECREF(old);
    if (--batch->remaining != 0) {
        return 0;
    }
    PyObject *args[3] = {batch->loop, batch->resolve, batch->future};
    PyObject *handle = PyObject_VectorcallMethod(call_soon_threadsafe_name, args, 3, NULL);
    if (handle == NULL) {
        return -1;
    }
    Py_DECREF(handle);
    return 0;
}

static PyObject *
batch_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *loop, *resolve, *future, *outcomes, *delivered, *latency, *on_error;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "KafkaBatch takes positional arguments only");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOOO!OOO:KafkaBatch", &loop, &resolve, &future, &PyList_Type, &outcomes, &delivered,
                          &latency, &on_error)) {
        return NULL;
    }
    KafkaBatchObject *self = (KafkaBatchObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->loop = Py_NewRef(loop);
    self->resolve = Py_NewRef(resolve);
    self->future = Py_NewRef(future);
    self->outcomes = Py_NewRef(outcomes);
    self->delivered = Py_NewRef(delivered);
    self->latency = Py_NewRef(latency);
    self->on_error = Py_NewRef(on_error);
    self->remaining = PyList_GET_SIZE(outcomes);
    self->started = monotonic_now();
    return (PyObject *)self;
}

static int
batch_traverse(KafkaBatchObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->loop);
    Py_VISIT(self->resolve);
    Py_VISIT(self->future);
    Py_VISIT(self->outcomes);
    Py_VISIT(self->delivered);
    Py_VISIT(self->latency);
    Py_VISIT(self->on_error);
    return 0;
}

static int
batch_clear(KafkaBatchObject *self)
{
    Py_CLEAR(self->loop);
    Py_CLEAR(self->resolve);
    Py_CLEAR(self->future);
    Py_CLEAR(self->outcomes);
    Py_CLEAR(self->delivered);
    Py_CLEAR(self->latency);
    Py_CLEAR(self->on_error);
    return 0;
}

static void
batch_dealloc(KafkaBatchObject *self)
{
    PyObject_GC_UnTrack(self);
    batch_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
batch_settle_method(KafkaBatchObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "settle(index, outcome)");
        return NULL;
    }
    Py_ssize_t index = PyLong_AsSsize_t(args[0]);
    if ((index == -1 && PyErr_Occurred()) || batch_settle(self, index, args[1]) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef batch_methods[] = {
    {"settle", (PyCFunction)(void (*)(void))batch_settle_method, METH_FASTCALL,
     "settle(index, outcome): the record's outcome; the last one resolves the future (any thread, with the GIL)"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef batch_members[] = {
    {"future", T_OBJECT, offsetof(KafkaBatchObject, future), READONLY, NULL},
    {"outcomes", T_OBJECT, offsetof(KafkaBatchObject, outcomes), READONLY, NULL},
    {"remaining", T_PYSSIZET, offsetof(KafkaBatchObject, remaining), READONLY, NULL},
    {"started", T_DOUBLE, offsetof(KafkaBatchObject, started), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject KafkaBatchType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tb_gateway._speedups.KafkaBatch",
    .tp_basicsize = sizeof(KafkaBatchObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "KafkaBatch(loop, resolve, future, outcomes, delivered, latency, on_error): one deliver() call",
    .tp_new = batch_new,
    .tp_traverse = (traverseproc)batch_traverse,
    .tp_clear = (inquiry)batch_clear,
    .tp_dealloc = (destructor)batch_dealloc,
    .tp_methods = batch_methods,
    .tp_members = batch_members,
};

typedef struct {
    PyObject_HEAD
    KafkaBatchObject *batch;
    Py_ssize_t index;
    vectorcallfunc vectorcall;
} DeliveryReportObject;

/* report(err, msg), from librdkafka's delivery report (the poll thread, holding the GIL) */
static PyObject *
report_call(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    DeliveryReportObject *self = (DeliveryReportObject *)callable;
    if (PyVectorcall_NARGS(nargsf) != 2 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "a delivery report takes (err, msg)");
        return NULL;
    }
    KafkaBatchObject *batch = self->batch;
    int rc;
    if (args[0] == Py_None) {
        rc = batch->latency == Py_None ? 0 : observe_seconds(batch->latency, monotonic_now() - batch->started);
        rc = rc < 0 ? rc : batch_settle(batch, self->index, batch->delivered);
    }
    else {
        PyObject *index = PyLong_FromSsize_t(self->index);
        PyObject *call[3] = {index, args[0], args[1]};
        PyObject *outcome = index == NULL ? NULL : PyObject_Vectorcall(batch->on_error, call, 3, NULL);
        rc = outcome == NULL ? -1 : batch_settle(batch, self->index, outcome);
        Py_XDECREF(index);
        Py_XDECREF(outcome);
    }
    return rc < 0 ? NULL : Py_NewRef(Py_None);
}

static int
report_traverse(DeliveryReportObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->batch);
    return 0;
}

static int
report_clear(DeliveryReportObject *self)
{
    Py_CLEAR(self->batch);
    return 0;
}

static void
report_dealloc(DeliveryReportObject *self)
{
    PyObject_GC_UnTrack(self);
    report_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject DeliveryReportType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tb_gateway._speedups.DeliveryReport",
    .tp_basicsize = sizeof(DeliveryReportObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "One record's delivery report callback (made by kafka_produce)",
    .tp_vectorcall_offset = offsetof(DeliveryReportObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_traverse = (traverseproc)report_traverse,
    .tp_clear = (inquiry)report_clear,
    .tp_dealloc = (destructor)report_dealloc,
};

static PyObject *produce_kwnames; /* ("headers", "on_delivery") */

/* kafka_produce(produce, records, topics, batch, encode, refusals) -> [(index, exception)] */
static PyObject *
speedups_kafka_produce(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 || !PyList_CheckExact(args[1]) || !PyList_CheckExact(args[2]) ||
        !Py_IS_TYPE(args[3], &KafkaBatchType) || PyList_GET_SIZE(args[1]) != PyList_GET_SIZE(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "kafka_produce(produce, records: list, topics: list, batch: KafkaBatch, encode, refusals)");
        return NULL;
    }
    PyObject *produce = args[0], *records = args[1], *topics = args[2], *encode = args[4], *refusals = args[5];
    KafkaBatchObject *batch = (KafkaBatchObject *)args[3];
    PyObject *refused = PyList_New(0);
    if (refused == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(records); i++) {
        PyObject *record = PyList_GET_ITEM(records, i);
        PyObject *encoded = encode_record(record);
        if (encoded == Py_None) {
            Py_DECREF(encoded);
            encoded = PyObject_CallOneArg(encode, record);
        }
        if (encoded == NULL) {
            goto fail;
        }
        if (!PyTuple_CheckExact(encoded) || PyTuple_GET_SIZE(encoded) != 3) {
            Py_DECREF(encoded);
            PyErr_SetString(PyExc_TypeError, "encode() must answer (key, value, headers)");
            goto fail;
        }
        DeliveryReportObject *report = PyObject_GC_New(DeliveryReportObject, &DeliveryReportType);
        if (report == NULL) {
            Py_DECREF(encoded);
            goto fail;
        }
        report->batch = (KafkaBatchObject *)Py_NewRef(batch);
        report->index = i;
        report->vectorcall = report_call;
        PyObject_GC_Track(report);
        PyObject *call[5] = {PyList_GET_ITEM(topics, i), PyTuple_GET_ITEM(encoded, 1), PyTuple_GET_ITEM(encoded, 0),
                             PyTuple_GET_ITEM(encoded, 2), (PyObject *)report};
        PyObject *none = PyObject_Vectorcall(produce, call, 3, produce_kwnames);
        Py_DECREF(report);
        Py_DECREF(encoded);
        if (none != NULL) {
            Py_DECREF(none);
            continue;
        }
        if (!PyErr_ExceptionMatches(refusals)) {
            goto fail;
        }
        PyObject *exc_type, *exc, *traceback;
        PyErr_Fetch(&exc_type, &exc, &traceback);
        PyErr_NormalizeException(&exc_type, &exc, &traceback);
        if (traceback != NULL) {
            PyException_SetTraceback(exc, traceback);
        }
        Py_XDECREF(exc_type);
        Py_XDECREF(traceback);
        PyObject *pair[2] = {PyLong_FromSsize_t(i), exc};
        PyObject *entry = tuple_steal(2, pair);
        if (entry == NULL || PyList_Append(refused, entry) < 0) {
            Py_XDECREF(entry);
            goto fail;
        }
        Py_DECREF(entry);
    }
    return refused;
fail:
    Py_DECREF(refused);
    return NULL;
}

static PyMethodDef kafka_methods[] = {
    {"kafka_encode", speedups_kafka_encode, METH_O,
     "kafka_encode(record) -> (key, value, headers) | None: kafka_records.encode's bytes; None: encode in Python"},
    {"kafka_produce", (PyCFunction)(void (*)(void))speedups_kafka_produce, METH_FASTCALL,
     "kafka_produce(produce, records, topics, batch, encode, refusals) -> [(index, exception)]"},
    {NULL, NULL, 0, NULL},
};

int
kafka_lane_init(PyObject *module)
{
    struct {
        PyObject **name;
        const char *text;
    } names[] = {
        {&device_name, "device"},         {&id_name, "id"},
        {&name_name, "name"},             {&type_name, "type"},
        {&kind_name, "kind"},             {&ts_name, "ts"},
        {&values_name, "values"},         {&transport_name, "transport"},
        {&received_at_name, "received_at"}, {&kind_header_name, "tb-kind"},
        {&transport_header_name, "tb-transport"}, {&msg_id_header_name, "tb-msg-id"},
        {&call_soon_threadsafe_name, "call_soon_threadsafe"},
    };
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        *names[i].name = PyUnicode_InternFromString(names[i].text);
        if (*names[i].name == NULL) {
            return -1;
        }
    }
    schema_header = Py_BuildValue("(sy)", "tb-schema", "1");
    produce_kwnames = Py_BuildValue("(ss)", "headers", "on_delivery");
    PyObject *orjson = PyImport_ImportModule("orjson");
    dumps_fn = orjson == NULL ? NULL : PyObject_GetAttrString(orjson, "dumps");
    Py_XDECREF(orjson);
    if (schema_header == NULL || produce_kwnames == NULL || dumps_fn == NULL || PyType_Ready(&KafkaBatchType) < 0 ||
        PyType_Ready(&DeliveryReportType) < 0 || PyModule_AddFunctions(module, kafka_methods) < 0) {
        return -1;
    }
    return PyModule_AddObjectRef(module, "KafkaBatch", (PyObject *)&KafkaBatchType);
}
