/* Optional C fast paths for the per-record hot spots: normalize.py (typing a payload's values),
 * sinks/segments.py (framing store entries and writing them durably, with the GIL released once a batch),
 * sinks/store.py (a batch's JSON lines), construct.py (building a slots dataclass), mqtt/codec.py (a run of the common PUBLISH), coap/codec.py
 * (parsing a datagram), coap/server.py (a batch of datagrams per system call) and http/connection.py
 * (reading one whole simple POST without httptools' callbacks); mqtt/session.py (the PUBACKs due), metrics.py
 * and pipeline.py (tallying and settling a delivered batch). Whole per-message paths are in _lanes.c.
 *
 * The Python code (or httptools) stays the reference. The fast paths handle only what is unambiguous and
 * answer None, or stop, for anything else, so the Python code runs and produces every error message;
 * framing is byte for byte what segments.frame() writes. tests/test_normalize.py, test_segments.py,
 * test_store.py, test_mqtt_codec.py, test_construct.py and test_http_fast.py compare both on generated input. Built by setup.py when a C compiler is present; without one, Python runs alone.
 */
#include "_speedups.h"
#include <structmember.h> /* T_OBJECT_EX, READONLY: maker() checks the slots it fills */
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <stdint.h>
#include <string.h>

#define MAX_KEY_LENGTH 255
#define HEADER_SIZE 16 /* segments.HEADER: "<IIQ" payload length, chained crc32, seq */

/* CRC-32 (IEEE 802.3, reflected 0xEDB88320), the same function as zlib.crc32, eight bytes a step
 * ("slicing-by-8": table k is the CRC of a byte followed by k zero bytes); a table-per-byte loop was 3% of the
 * gateway's CPU under MQTT load. */
static uint32_t crc_tables[8][256];

static void
crc_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) {
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        }
        crc_tables[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        for (int k = 1; k < 8; k++) {
            uint32_t c = crc_tables[k - 1][n];
            crc_tables[k][n] = crc_tables[0][c & 0xFF] ^ (c >> 8);
        }
    }
}

static uint32_t
crc32_update(uint32_t crc, const unsigned char *data, Py_ssize_t n)
{
    crc = ~crc;
    for (; n >= 8; data += 8, n -= 8) {
        uint32_t low = crc ^ ((uint32_t)data[0] | (uint32_t)data[1] << 8 | (uint32_t)data[2] << 16 | (uint32_t)data[3] << 24);
        uint32_t high = (uint32_t)data[4] | (uint32_t)data[5] << 8 | (uint32_t)data[6] << 16 | (uint32_t)data[7] << 24;
        crc = crc_tables[7][low & 0xFF] ^ crc_tables[6][(low >> 8) & 0xFF] ^ crc_tables[5][(low >> 16) & 0xFF]
              ^ crc_tables[4][low >> 24] ^ crc_tables[3][high & 0xFF] ^ crc_tables[2][(high >> 8) & 0xFF]
              ^ crc_tables[1][(high >> 16) & 0xFF] ^ crc_tables[0][high >> 24];
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        crc = crc_tables[0][(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
    }
    return ~crc;
}

static void
put_le(unsigned char *out, uint64_t value, int bytes)
{
    for (int i = 0; i < bytes; i++) {
        out[i] = (unsigned char)(value >> (8 * i));
    }
}

/* A string that type cast could turn into a number: -?(\d+(\.\d+)?|\.\d+) over ASCII digits. Any
 * non-ASCII string counts as "maybe" (Python's \d also matches other digits): the caller falls back. */
static int
maybe_numeric(PyObject *s)
{
    if (!PyUnicode_IS_ASCII(s)) {
        return 1;
    }
    const char *p = (const char *)PyUnicode_DATA(s);
    Py_ssize_t n = PyUnicode_GET_LENGTH(s), i = 0, digits = 0, frac = 0;
    if (i < n && p[i] == '-') {
        i++;
    }
    while (i < n && p[i] >= '0' && p[i] <= '9') {
        i++;
        digits++;
    }
    if (i < n && p[i] == '.') {
        i++;
        while (i < n && p[i] >= '0' && p[i] <= '9') {
            i++;
            frac++;
        }
        if (frac == 0) {
            return 0;
        }
    }
    return i == n && (digits > 0 || frac > 0);
}

/* typed_values for the common case: a new dict without nulls, or NULL with no exception set = "ask
 * Python" (an integral double, a string type cast may change or that is too long, a big integer, nested
 * JSON, a long key, a subclass such as the literal-keeping parser's numbers). */
static PyObject *
fast_values(PyObject *raw, int type_cast, Py_ssize_t max_string, int reuse)
{
    /* reuse: ``raw`` is a freshly parsed document no one else holds, so it is the answer itself when it has
     * no null to drop (values are only checked, never changed): no copy */
    PyObject *values = reuse ? NULL : PyDict_New();
    if (values == NULL && !reuse) {
        return NULL;
    }
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(raw, &pos, &key, &value)) {
        if (!PyUnicode_CheckExact(key) || PyUnicode_GET_LENGTH(key) > MAX_KEY_LENGTH) {
            goto fallback;
        }
        if (value == Py_None) {
            if (values == NULL) { /* a null to drop after all: copy what was checked so far, then go on */
                values = PyDict_New();
                if (values == NULL) {
                    return NULL;
                }
                Py_ssize_t again = 0;
                PyObject *k, *v;
                while (again < pos - 1 && PyDict_Next(raw, &again, &k, &v)) {
                    if (v != Py_None && PyDict_SetItem(values, k, v) < 0) {
                        Py_DECREF(values);
                        return NULL;
                    }
                }
            }
            continue;
        }
        if (PyFloat_CheckExact(value)) {
            double d = PyFloat_AS_DOUBLE(value);
            if (!isfinite(d) || floor(d) == d) {
                goto fallback; /* 42.0 or 1e3: only the literal tells double from long */
            }
        }
        else if (PyLong_CheckExact(value)) {
            int overflow = 0;
            (void)PyLong_AsLongLongAndOverflow(value, &overflow);
            if (overflow) {
                goto fallback;
            }
        }
        else if (PyBool_Check(value)) {
            /* kept as is */
        }
        else if (PyUnicode_CheckExact(value)) {
            if (max_string > 0 && PyUnicode_GET_LENGTH(value) > max_string) {
                goto fallback;
            }
            if (type_cast && maybe_numeric(value)) {
                goto fallback;
            }
        }
        else {
            goto fallback;
        }
        if (values != NULL && PyDict_SetItem(values, key, value) < 0) {
            Py_DECREF(values);
            return NULL;
        }
    }
    if (values == NULL) {
        Py_INCREF(raw);
        return raw;
    }
    return values;
fallback:
    Py_XDECREF(values);
    return NULL;
}

static int
parse_rules(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t first, int *type_cast, Py_ssize_t *max_string)
{
    if (nargs != first + 2) {
        PyErr_SetString(PyExc_TypeError, "wrong number of arguments");
        return -1;
    }
    *type_cast = PyObject_IsTrue(args[first]);
    if (*type_cast < 0) {
        return -1;
    }
    *max_string = PyLong_AsSsize_t(args[first + 1]);
    if (*max_string == -1 && PyErr_Occurred()) {
        return -1;
    }
    return 0;
}

/* values(raw: dict, type_cast: bool, max_string_length: int) -> dict | None */
static PyObject *
speedups_values(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    int type_cast;
    Py_ssize_t max_string;
    if (parse_rules(args, nargs, 1, &type_cast, &max_string) < 0) {
        return NULL;
    }
    if (!PyDict_CheckExact(args[0])) {
        Py_RETURN_NONE;
    }
    PyObject *values = fast_values(args[0], type_cast, max_string, 0);
    if (values == NULL && !PyErr_Occurred()) {
        Py_RETURN_NONE;
    }
    return values;
}

/* One telemetry item: (ts, values) appended to groups when values is not empty; 0 ok, 1 fall back, -1 error. */
static int
add_item(PyObject *groups, PyObject *item, PyObject *now, int type_cast, Py_ssize_t max_string,
         PyObject *ts_key, PyObject *values_key)
{
    if (!PyDict_CheckExact(item)) {
        return 1;
    }
    PyObject *ts = PyDict_GetItemWithError(item, ts_key); /* borrowed */
    PyObject *raw = ts == NULL ? NULL : PyDict_GetItemWithError(item, values_key);
    if (PyErr_Occurred()) {
        return -1;
    }
    if (ts != NULL && raw != NULL) {
        if (!PyLong_CheckExact(ts) || !PyDict_CheckExact(raw)) {
            return 1;
        }
        int overflow = 0;
        long long t = PyLong_AsLongLongAndOverflow(ts, &overflow);
        if (overflow || t < 0) {
            return 1;
        }
    }
    else {
        ts = now;
        raw = item;
    }
    PyObject *values = fast_values(raw, type_cast, max_string, 1);
    if (values == NULL) {
        return PyErr_Occurred() ? -1 : 1;
    }
    int rc = 0;
    if (PyDict_GET_SIZE(values) > 0) {
        PyObject *group = PyTuple_Pack(2, ts, values);
        rc = group == NULL ? -1 : PyList_Append(groups, group);
        Py_XDECREF(group);
    }
    Py_DECREF(values);
    return rc;
}

static PyObject *ts_name, *values_name, *device_name, *kind_name, *transport_name, *received_at_name;
static PyObject *popleft_name, *done_name, *result_name, *pending_name, *outcome_name, *then_name, *set_result_name;

/* The telemetry groups of a parsed document: a new list, NULL without an error to fall back to
 * normalize.py, NULL with one on failure. Shared with _lanes.c. */
PyObject *
telemetry_groups(PyObject *document, PyObject *now, int type_cast, Py_ssize_t max_string)
{
    PyObject *groups = PyList_New(0);
    if (groups == NULL) {
        return NULL;
    }
    int rc;
    if (PyDict_CheckExact(document)) {
        rc = add_item(groups, document, now, type_cast, max_string, ts_name, values_name);
    }
    else if (PyList_CheckExact(document)) {
        rc = 0;
        for (Py_ssize_t i = 0; rc == 0 && i < PyList_GET_SIZE(document); i++) {
            rc = add_item(groups, PyList_GET_ITEM(document, i), now, type_cast, max_string, ts_name, values_name);
        }
    }
    else {
        rc = 1;
    }
    if (rc != 0) {
        Py_DECREF(groups);
        return NULL;
    }
    return groups;
}

/* telemetry(document, now_ms: int, type_cast: bool, max_string_length: int) -> [(ts, values)] | None */
static PyObject *
speedups_telemetry(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    int type_cast;
    Py_ssize_t max_string;
    if (parse_rules(args, nargs, 2, &type_cast, &max_string) < 0) {
        return NULL;
    }
    PyObject *groups = telemetry_groups(args[0], args[1], type_cast, max_string);
    if (groups == NULL && !PyErr_Occurred()) {
        Py_RETURN_NONE;
    }
    return groups;
}

/* frame(payloads: list[bytes], index, offset, seq, crc, room) -> (bytes, index, offset, seq, crc)
 *
 * segments.frame() for payloads[index:] while each entry ends at or before ``room``: the joined entries and
 * the cursor after them (the caller seals the segment when not all of them fitted). */
static PyObject *
speedups_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 6 || !PyList_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "frame(payloads: list, index, offset, seq, crc, room)");
        return NULL;
    }
    PyObject *payloads = args[0];
    Py_ssize_t index = PyLong_AsSsize_t(args[1]);
    long long offset = PyLong_AsLongLong(args[2]);
    unsigned long long seq = PyLong_AsUnsignedLongLong(args[3]);
    unsigned long crc_in = PyLong_AsUnsignedLong(args[4]);
    long long room = PyLong_AsLongLong(args[5]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (crc_in > 0xFFFFFFFFul || index < 0) {
        PyErr_SetString(PyExc_ValueError, "crc or index out of range");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(payloads), end = index;
    long long size = 0;
    while (end < n) {
        PyObject *p = PyList_GET_ITEM(payloads, end);
        if (!PyBytes_CheckExact(p)) {
            PyErr_SetString(PyExc_TypeError, "payloads must be bytes");
            return NULL;
        }
        long long entry = HEADER_SIZE + (long long)PyBytes_GET_SIZE(p);
        if (offset + size + entry > room) {
            break;
        }
        size += entry;
        end++;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (out == NULL) {
        return NULL;
    }
    unsigned char *w = (unsigned char *)PyBytes_AS_STRING(out);
    uint32_t crc = (uint32_t)crc_in;
    for (Py_ssize_t i = index; i < end; i++) {
        PyObject *p = PyList_GET_ITEM(payloads, i);
        Py_ssize_t len = PyBytes_GET_SIZE(p);
        unsigned char fields[12]; /* segments._CRC_FIELDS: "<IQ" length, seq */
        put_le(fields, (uint64_t)len, 4);
        put_le(fields + 4, seq, 8);
        crc = crc32_update(crc32_update(crc, fields, 12), (const unsigned char *)PyBytes_AS_STRING(p), len);
        put_le(w, (uint64_t)len, 4);
        put_le(w + 4, crc, 4);
        put_le(w + 8, seq, 8);
        memcpy(w + HEADER_SIZE, PyBytes_AS_STRING(p), (size_t)len);
        w += HEADER_SIZE + len;
        seq++;
    }
    return Py_BuildValue("(NnLKk)", out, end, offset + size, seq, (unsigned long)crc);
}


/* ---- The embedded store's durable append (sinks/segments.py), in one release of the GIL ----
 *
 * append_durably(lock_fd, fd, data, offset) -> bool: under flock(lock_fd), if the 16 bytes at `offset` are
 * still zero (no other writer appended since this one's last write), pwrite `data` there and fdatasync;
 * True once durable. False, having written nothing, when another writer moved the tail: the caller catches
 * up the slow way and frames again. An I/O error raises OSError, the lock released. The Python path does the
 * same in five system calls that each release and take back the GIL, while the event loop thread wants it;
 * here the GIL is given up twice: for the lock (which may wait on another writer) and for the rest. */
static PyObject *
speedups_append_durably(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyBytes_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "append_durably(lock_fd: int, fd: int, data: bytes, offset: int)");
        return NULL;
    }
    int lock_fd = PyLong_AsLong(args[0]), fd = PyLong_AsLong(args[1]);
    long long offset = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    const char *data = PyBytes_AS_STRING(args[2]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[2]);
    int failed = 0, moved = 0, error = 0, locked;
    for (;;) { /* PEP 475: a signal retries the wait, unless its handler raised (Ctrl-C, a test's timeout) */
        Py_BEGIN_ALLOW_THREADS
        locked = flock(lock_fd, LOCK_EX);
        Py_END_ALLOW_THREADS
        if (locked == 0) {
            break;
        }
        if (errno != EINTR) {
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        if (PyErr_CheckSignals() < 0) {
            return NULL;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    unsigned char header[HEADER_SIZE];
    ssize_t got;
    do {
        got = pread(fd, header, HEADER_SIZE, (off_t)offset);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        failed = 1;
        error = errno;
    }
    else if (got < HEADER_SIZE) {
        moved = 1; /* the file is shorter than it was: the slow path gives it its room back */
    }
    else {
        for (int i = 0; i < HEADER_SIZE; i++) {
            moved |= header[i] != 0;
        }
    }
    Py_ssize_t at = 0;
    while (!failed && !moved && at < size) {
        ssize_t written = pwrite(fd, data + at, (size_t)(size - at), (off_t)(offset + at));
        if (written < 0 && errno != EINTR) {
            failed = 1;
            error = errno;
        }
        else if (written > 0) {
            at += written;
        }
        else if (written == 0) {
            failed = 1; /* a regular file never takes nothing: do not spin */
            error = EIO;
        }
    }
    if (!failed && !moved && fdatasync(fd) < 0) {
        failed = 1;
        error = errno;
    }
    while (flock(lock_fd, LOCK_UN) < 0 && errno == EINTR) {
    }
    Py_END_ALLOW_THREADS
    if (failed) {
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBool_FromLong(!moved);
}

/* ---- CoAP: codec.decode() for well-formed messages ---- */

/* A tuple of new references it takes over (PyTuple_Pack without the increfs, Py_BuildValue without parsing
 * a format per datagram); NULL, with every item released, if any item is NULL */
PyObject *
tuple_steal(Py_ssize_t n, PyObject **items)
{
    PyObject *tuple = NULL;
    int complete = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        complete = complete && items[i] != NULL;
    }
    if (complete) {
        tuple = PyTuple_New(n);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (tuple != NULL) {
            PyTuple_SET_ITEM(tuple, i, items[i]);
        }
        else {
            Py_XDECREF(items[i]);
        }
    }
    return tuple;
}

/* coap_decode(data) -> (type, code, mid, token, options, payload), the fields of codec.Message, or None
 * for anything malformed: codec.decode() then parses it again and raises the error that says why. */
PyObject *
speedups_coap_decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1 || !PyBytes_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "coap_decode(data: bytes)");
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    if (n < 4 || data[0] >> 6 != 1) {
        Py_RETURN_NONE;
    }
    int type = (data[0] >> 4) & 3, tkl = data[0] & 0x0F, code = data[1], mid = data[2] << 8 | data[3];
    if (tkl > 8 || (code == 0 && (tkl || n > 4)) || 4 + tkl > n) {
        Py_RETURN_NONE;
    }
    /* first pass: validate and count, so the options tuple is built once at its size */
    Py_ssize_t pos = 4 + tkl, count = 0, payload_at = n;
    while (pos < n) {
        unsigned int byte = data[pos++];
        if (byte == 0xFF) {
            if (pos == n) {
                Py_RETURN_NONE; /* payload marker with an empty payload */
            }
            payload_at = pos;
            break;
        }
        unsigned int delta = byte >> 4, length = byte & 0x0F;
        if (delta == 15 || length == 15) {
            Py_RETURN_NONE;
        }
        pos += (delta == 13) + 2 * (delta == 14) + (length == 13) + 2 * (length == 14);
        if (pos > n) {
            Py_RETURN_NONE; /* truncated option header */
        }
        if (length >= 13) {
            length = length == 13 ? data[pos - 1] + 13u : (data[pos - 2] << 8 | data[pos - 1]) + 269u;
        }
        if ((Py_ssize_t)length > n - pos) {
            Py_RETURN_NONE; /* option value runs past the datagram */
        }
        pos += length;
        count++;
    }
    PyObject *options = PyTuple_New(count);
    if (options == NULL) {
        return NULL;
    }
    long number = 0;
    pos = 4 + tkl;
    for (Py_ssize_t i = 0; i < count; i++) {
        unsigned int byte = data[pos++];
        unsigned int delta = byte >> 4, length = byte & 0x0F;
        if (delta == 13) {
            delta = data[pos++] + 13u;
        }
        else if (delta == 14) {
            delta = (data[pos] << 8 | data[pos + 1]) + 269u;
            pos += 2;
        }
        if (length == 13) {
            length = data[pos++] + 13u;
        }
        else if (length == 14) {
            length = (data[pos] << 8 | data[pos + 1]) + 269u;
            pos += 2;
        }
        number += delta;
        PyObject *parts[] = {PyLong_FromLong(number), PyBytes_FromStringAndSize((const char *)data + pos, length)};
        PyObject *option = tuple_steal(2, parts);
        if (option == NULL) {
            Py_DECREF(options);
            return NULL;
        }
        PyTuple_SET_ITEM(options, i, option);
        pos += length;
    }
    PyObject *parts[] = {PyLong_FromLong(type),
                         PyLong_FromLong(code),
                         PyLong_FromLong(mid),
                         PyBytes_FromStringAndSize((const char *)data + 4, (Py_ssize_t)tkl),
                         options,
                         PyBytes_FromStringAndSize((const char *)data + payload_at, n - payload_at)};
    return tuple_steal(6, parts);
}

/* ---- Datagram batches for the CoAP socket: one recvmmsg / sendmmsg per batch, not a syscall per datagram ----
 *
 * Addresses are the tuples the socket module (and uvloop) build: (host, port) for IPv4, (host, port,
 * flowinfo, scope_id) for IPv6. A peer's tuple is built once and cached with its raw sockaddr, so the many
 * datagrams of one client share one tuple and a reply's sockaddr is not parsed back from text. */

#define DGRAM_BATCH 32
#define DGRAM_MAX 65536 /* any UDP datagram fits: nothing is truncated */
#define ADDRESS_CACHE_MAX 65536

static char *dgram_buffers;     /* DGRAM_BATCH x DGRAM_MAX, allocated at the first receive */
static PyObject *tuple_by_raw;  /* raw sockaddr (bytes) -> address tuple */
static PyObject *raw_by_tuple;  /* address tuple -> raw sockaddr (bytes) */

static PyObject *
address_tuple(const struct sockaddr_storage *sa, socklen_t len)
{
    PyObject *raw = PyBytes_FromStringAndSize((const char *)sa, len);
    if (raw == NULL) {
        return NULL;
    }
    PyObject *cached = PyDict_GetItemWithError(tuple_by_raw, raw);
    if (cached != NULL || PyErr_Occurred()) {
        Py_DECREF(raw);
        Py_XINCREF(cached);
        return cached;
    }
    char host[INET6_ADDRSTRLEN];
    PyObject *tuple;
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        tuple = Py_BuildValue("(si)", host, ntohs(in->sin_port));
    }
    else if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        tuple = Py_BuildValue("(siIk)", host, ntohs(in6->sin6_port), ntohl(in6->sin6_flowinfo),
                              (unsigned long)in6->sin6_scope_id);
    }
    else {
        tuple = Py_BuildValue("(si)", "", 0); /* not an IP socket: never for the CoAP server */
    }
    if (tuple == NULL) {
        Py_DECREF(raw);
        return NULL;
    }
    if (PyDict_GET_SIZE(tuple_by_raw) >= ADDRESS_CACHE_MAX) {
        PyDict_Clear(tuple_by_raw);
        PyDict_Clear(raw_by_tuple);
    }
    if (PyDict_SetItem(tuple_by_raw, raw, tuple) < 0 || PyDict_SetItem(raw_by_tuple, tuple, raw) < 0) {
        Py_DECREF(raw);
        Py_DECREF(tuple);
        return NULL;
    }
    Py_DECREF(raw);
    return tuple;
}

/* The sockaddr of an address tuple: from the cache, else parsed (0: not an IP address tuple). */
static socklen_t
address_raw(PyObject *tuple, struct sockaddr_storage *out)
{
    PyObject *raw = PyDict_GetItemWithError(raw_by_tuple, tuple);
    if (raw != NULL) {
        memcpy(out, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw));
        return (socklen_t)PyBytes_GET_SIZE(raw);
    }
    if (PyErr_Occurred() || !PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) < 2) {
        PyErr_Clear();
        return 0;
    }
    const char *host = PyUnicode_Check(PyTuple_GET_ITEM(tuple, 0)) ? PyUnicode_AsUTF8(PyTuple_GET_ITEM(tuple, 0)) : NULL;
    long port = PyLong_AsLong(PyTuple_GET_ITEM(tuple, 1));
    if (host == NULL || port < 0 || port > 65535) {
        PyErr_Clear();
        return 0;
    }
    memset(out, 0, sizeof *out);
    struct sockaddr_in *in = (struct sockaddr_in *)out;
    if (inet_pton(AF_INET, host, &in->sin_addr) == 1) {
        in->sin_family = AF_INET;
        in->sin_port = htons((uint16_t)port);
        return sizeof *in;
    }
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)out;
    if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        if (PyTuple_GET_SIZE(tuple) >= 4) {
            in6->sin6_flowinfo = htonl((uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(tuple, 2)));
            in6->sin6_scope_id = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(tuple, 3));
            PyErr_Clear();
        }
        return sizeof *in6;
    }
    return 0;
}

/* recv_datagrams(fd) -> [(data, address), ...]: what one recvmmsg returns on a non-blocking socket, up to
 * DGRAM_BATCH datagrams; [] when there is nothing to read. */
static PyObject *
speedups_recv_datagrams(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int fd = nargs == 1 ? PyLong_AsLong(args[0]) : -1;
    if (fd < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "recv_datagrams(fd: int)");
        }
        return NULL;
    }
    if (dgram_buffers == NULL && (dgram_buffers = PyMem_RawMalloc((size_t)DGRAM_BATCH * DGRAM_MAX)) == NULL) {
        return PyErr_NoMemory();
    }
    struct mmsghdr msgs[DGRAM_BATCH];
    struct iovec iovs[DGRAM_BATCH];
    struct sockaddr_storage peers[DGRAM_BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < DGRAM_BATCH; i++) {
        iovs[i].iov_base = dgram_buffers + (size_t)i * DGRAM_MAX;
        iovs[i].iov_len = DGRAM_MAX;
        msgs[i].msg_hdr.msg_name = &peers[i];
        msgs[i].msg_hdr.msg_namelen = sizeof peers[i];
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    int got;
    do {
        got = recvmmsg(fd, msgs, DGRAM_BATCH, MSG_DONTWAIT, NULL);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return PyList_New(0);
        }
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *out = PyList_New(got);
    if (out == NULL) {
        return NULL;
    }
    for (int i = 0; i < got; i++) {
        PyObject *address = address_tuple(&peers[i], msgs[i].msg_hdr.msg_namelen);
        PyObject *parts[] = {
            address == NULL ? NULL : PyBytes_FromStringAndSize(iovs[i].iov_base, (Py_ssize_t)msgs[i].msg_len), address};
        PyObject *item = tuple_steal(2, parts);
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, item);
    }
    return out;
}

/* send_datagrams(fd, datagrams, start) -> index: sends datagrams[start:] ([(data, address), ...]) with
 * sendmmsg until done or the socket buffer is full; returns the index of the first one not sent. A datagram
 * the kernel refuses for itself (no route, too large, an address that is not one) is dropped, as a lost
 * datagram would be: CoAP's retransmission covers it. */
static PyObject *
speedups_send_datagrams(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyList_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "send_datagrams(fd: int, datagrams: list, start: int)");
        return NULL;
    }
    int fd = PyLong_AsLong(args[0]);
    Py_ssize_t index = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *datagrams = args[1];
    struct mmsghdr msgs[DGRAM_BATCH];
    struct iovec iovs[DGRAM_BATCH];
    struct sockaddr_storage peers[DGRAM_BATCH];
    while (index < PyList_GET_SIZE(datagrams)) {
        int count = 0;
        Py_ssize_t taken = index;
        memset(msgs, 0, sizeof msgs);
        while (count < DGRAM_BATCH && taken < PyList_GET_SIZE(datagrams)) {
            PyObject *item = PyList_GET_ITEM(datagrams, taken);
            if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(item, 0))) {
                PyErr_SetString(PyExc_TypeError, "datagrams holds (bytes, address) pairs");
                return NULL;
            }
            socklen_t len = address_raw(PyTuple_GET_ITEM(item, 1), &peers[count]);
            if (len == 0) {
                if (count == 0) {
                    index = ++taken; /* not an address: dropped */
                    continue;
                }
                break; /* send what precedes it first */
            }
            iovs[count].iov_base = PyBytes_AS_STRING(PyTuple_GET_ITEM(item, 0));
            iovs[count].iov_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 0));
            msgs[count].msg_hdr.msg_name = &peers[count];
            msgs[count].msg_hdr.msg_namelen = len;
            msgs[count].msg_hdr.msg_iov = &iovs[count];
            msgs[count].msg_hdr.msg_iovlen = 1;
            count++;
            taken++;
        }
        if (count == 0) {
            continue;
        }
        int sent;
        do {
            sent = sendmmsg(fd, msgs, count, MSG_DONTWAIT);
        } while (sent < 0 && errno == EINTR);
        if (sent < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
                break; /* the caller waits until the socket is writable */
            }
            if (errno == EBADF || errno == ENOTSOCK) {
                return PyErr_SetFromErrno(PyExc_OSError);
            }
            sent = 1; /* this datagram is refused: drop it, go on with the next */
        }
        index += sent;
    }
    return PyLong_FromSsize_t(index);
}

/* mqtt_publishes(buf, pos, topics, v5, limit, publish) -> (packets, pos): mqtt/codec.py's inline decoding of
 * the common packet, for a whole run of them. From ``pos``, every QoS 1 PUBLISH (first byte 0x32) with a
 * one-byte remaining length of 4..min(127, limit), a topic already in ``topics`` (raw bytes -> name), a
 * non-zero packet id and, in MQTT 5, no properties becomes publish(topic, payload, 1, packet_id). It stops
 * at the first packet that is anything else or incomplete, and says where: the Python decoder goes on from
 * there. */
static PyObject *
speedups_mqtt_publishes(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 || !PyBytes_Check(args[0]) || !PyDict_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "mqtt_publishes(buf: bytes, pos: int, topics: dict, v5: bool, limit: int, publish)");
        return NULL;
    }
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    int v5 = PyObject_IsTrue(args[3]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[4]);
    if ((pos == -1 || limit == -1 || v5 < 0) && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *topics = args[2], *publish = args[5];
    PyObject *packets = PyList_New(0);
    if (packets == NULL) {
        return NULL;
    }
    PyObject *one = PyLong_FromLong(1);
    while (one != NULL && pos >= 0 && pos + 2 <= n && buf[pos] == 0x32) {
        Py_ssize_t length = buf[pos + 1];
        if (length >= 0x80 || length > limit || length < 4) {
            break;
        }
        Py_ssize_t start = pos + 2, end = start + length;
        if (end > n) {
            break; /* incomplete: the Python decoder keeps the tail */
        }
        Py_ssize_t p = start + 2 + ((buf[start] << 8) | buf[start + 1]);
        if (p + 2 > end) {
            break;
        }
        PyObject *raw = PyBytes_FromStringAndSize((const char *)buf + start + 2, p - start - 2);
        if (raw == NULL) {
            goto error;
        }
        PyObject *topic = PyDict_GetItemWithError(topics, raw); /* borrowed */
        Py_DECREF(raw);
        if (topic == NULL) {
            if (PyErr_Occurred()) {
                goto error;
            }
            break;
        }
        long packet_id = (buf[p] << 8) | buf[p + 1];
        p += 2;
        if (packet_id == 0 || (v5 && (p >= end || buf[p] != 0))) {
            break;
        }
        p += v5;
        PyObject *payload = PyBytes_FromStringAndSize((const char *)buf + p, end - p);
        PyObject *id = payload == NULL ? NULL : PyLong_FromLong(packet_id);
        PyObject *packet = NULL;
        if (id != NULL) {
            PyObject *call[4] = {topic, payload, one, id};
            packet = PyObject_Vectorcall(publish, call, 4, NULL);
        }
        Py_XDECREF(payload);
        Py_XDECREF(id);
        if (packet == NULL || PyList_Append(packets, packet) < 0) {
            Py_XDECREF(packet);
            goto error;
        }
        Py_DECREF(packet);
        pos = end;
    }
    if (one == NULL) {
        goto error;
    }
    Py_DECREF(one);
    return Py_BuildValue("(Nn)", packets, pos);
error:
    Py_XDECREF(one);
    Py_DECREF(packets);
    return NULL;
}

/* entry(head, ts, values, tail, received_at) -> bytes | None: the embedded store's JSON line,
 * head + str(ts) + ',"values":' + values + tail + str(received_at) + '}' (sinks/store.py's _encode, whose
 * bytes %-format cost twice this); None for an integer beyond 64 bits. */
/* str(value) into text (24 bytes at least); its length. snprintf("%lld") was a sixth of a batch's lines. */
static int
format_long(char *text, long long value)
{
    char digits[24];
    int n = 0;
    unsigned long long rest = value < 0 ? 0ull - (unsigned long long)value : (unsigned long long)value;
    do {
        digits[n++] = (char)('0' + rest % 10);
        rest /= 10;
    } while (rest);
    int len = 0;
    if (value < 0) {
        text[len++] = '-';
    }
    while (n) {
        text[len++] = digits[--n];
    }
    return len;
}

/* head + str(ts) + ',"values":' + values + tail + str(received_at) + '}' as a new bytes */
static PyObject *
join_entry(PyObject *head, long long ts, PyObject *values, PyObject *tail, long long at)
{
    char ts_text[24], at_text[24];
    int ts_len = format_long(ts_text, ts);
    int at_len = format_long(at_text, at);
    static const char middle[] = ",\"values\":";
    Py_ssize_t middle_len = (Py_ssize_t)sizeof middle - 1;
    Py_ssize_t head_len = PyBytes_GET_SIZE(head), values_len = PyBytes_GET_SIZE(values);
    Py_ssize_t tail_len = PyBytes_GET_SIZE(tail);
    PyObject *out = PyBytes_FromStringAndSize(NULL, head_len + ts_len + middle_len + values_len + tail_len + at_len + 1);
    if (out == NULL) {
        return NULL;
    }
    char *w = PyBytes_AS_STRING(out);
    memcpy(w, PyBytes_AS_STRING(head), (size_t)head_len);
    w += head_len;
    memcpy(w, ts_text, (size_t)ts_len);
    w += ts_len;
    memcpy(w, middle, (size_t)middle_len);
    w += middle_len;
    memcpy(w, PyBytes_AS_STRING(values), (size_t)values_len);
    w += values_len;
    memcpy(w, PyBytes_AS_STRING(tail), (size_t)tail_len);
    w += tail_len;
    memcpy(w, at_text, (size_t)at_len);
    w += at_len;
    *w = '}';
    return out;
}

static PyObject *
speedups_entry(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyBytes_Check(args[0]) || !PyLong_CheckExact(args[1]) || !PyBytes_Check(args[2]) ||
        !PyBytes_Check(args[3]) || !PyLong_CheckExact(args[4])) {
        PyErr_SetString(PyExc_TypeError, "entry(head: bytes, ts: int, values: bytes, tail: bytes, received_at: int)");
        return NULL;
    }
    int overflow_ts = 0, overflow_at = 0;
    long long ts = PyLong_AsLongLongAndOverflow(args[1], &overflow_ts);
    long long at = PyLong_AsLongLongAndOverflow(args[4], &overflow_at);
    if (overflow_ts || overflow_at) {
        Py_RETURN_NONE;
    }
    return join_entry(args[0], ts, args[2], args[3], at);
}

/* One record's line from its cached template, or NULL with no exception set: ask the Python encoder. */
static PyObject *
store_line(PyObject *record, PyObject *templates, PyObject *dumps)
{
    PyObject *device = NULL, *kind = NULL, *transport = NULL, *ts = NULL, *at = NULL, *values = NULL;
    PyObject *key = NULL, *id = NULL, *encoded = NULL, *line = NULL;
    if ((device = GETATTR(record, device_name)) == NULL || (kind = GETATTR(record, kind_name)) == NULL ||
        (transport = GETATTR(record, transport_name)) == NULL || (ts = GETATTR(record, ts_name)) == NULL ||
        (at = GETATTR(record, received_at_name)) == NULL || (values = GETATTR(record, values_name)) == NULL ||
        (id = PyLong_FromVoidPtr(device)) == NULL || (key = PyTuple_Pack(3, id, kind, transport)) == NULL) {
        goto done;
    }
    PyObject *parts = PyDict_GetItemWithError(templates, key); /* borrowed: (device, head, tail) */
    if (parts == NULL || !PyTuple_CheckExact(parts) || PyTuple_GET_SIZE(parts) != 3 || PyTuple_GET_ITEM(parts, 0) != device ||
        !PyBytes_CheckExact(PyTuple_GET_ITEM(parts, 1)) || !PyBytes_CheckExact(PyTuple_GET_ITEM(parts, 2)) ||
        !PyLong_CheckExact(ts) || !PyLong_CheckExact(at)) {
        goto done;
    }
    int overflow_ts = 0, overflow_at = 0;
    long long ts_value = PyLong_AsLongLongAndOverflow(ts, &overflow_ts);
    long long at_value = PyLong_AsLongLongAndOverflow(at, &overflow_at);
    if (overflow_ts || overflow_at || (encoded = PyObject_CallOneArg(dumps, values)) == NULL || !PyBytes_CheckExact(encoded)) {
        goto done;
    }
    line = join_entry(PyTuple_GET_ITEM(parts, 1), ts_value, encoded, PyTuple_GET_ITEM(parts, 2), at_value);
done:
    Py_XDECREF(device);
    Py_XDECREF(kind);
    Py_XDECREF(transport);
    Py_XDECREF(ts);
    Py_XDECREF(at);
    Py_XDECREF(values);
    Py_XDECREF(id);
    Py_XDECREF(key);
    Py_XDECREF(encoded);
    return line;
}

/* store_lines(records, templates, dumps, encode) -> [bytes]: sinks/store.py's _encode for a whole batch. A
 * record whose template (``templates[(id(device), kind, transport)] == (device, head, tail)``) is cached and
 * whose ``ts`` and ``received_at`` fit 64 bits is joined here around ``dumps(values)``; any other, and any
 * record whose encoding raised, goes to ``encode(record)``, which also fills the cache. */
static PyObject *
speedups_store_lines(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyList_CheckExact(args[0]) || !PyDict_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "store_lines(records: list, templates: dict, dumps, encode)");
        return NULL;
    }
    PyObject *records = args[0];
    Py_ssize_t n = PyList_GET_SIZE(records);
    PyObject *lines = PyList_New(n);
    if (lines == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyList_GET_SIZE(records) != n) { /* encode() is Python code: the batch must not change under it */
            PyErr_SetString(PyExc_RuntimeError, "store_lines: the records changed while they were encoded");
            Py_DECREF(lines);
            return NULL;
        }
        PyObject *record = PyList_GET_ITEM(records, i);
        Py_INCREF(record);
        PyObject *line = store_line(record, args[1], args[2]);
        if (line == NULL) {
            PyErr_Clear(); /* the Python encoder raises it again, or knows better */
            line = PyObject_CallOneArg(args[3], record);
        }
        Py_DECREF(record);
        if (line == NULL) {
            Py_DECREF(lines);
            return NULL;
        }
        PyList_SET_ITEM(lines, i, line);
    }
    return lines;
}

/* counts[key] += n */
static int
add_count(PyObject *counts, PyObject *key, Py_ssize_t n)
{
    PyObject *old = PyDict_GetItemWithError(counts, key); /* borrowed */
    if (old == NULL && PyErr_Occurred()) {
        return -1;
    }
    Py_ssize_t total = n + (old == NULL ? 0 : PyLong_AsSsize_t(old));
    PyObject *value = PyLong_FromSsize_t(total);
    if (value == NULL) {
        return -1;
    }
    int result = PyDict_SetItem(counts, key, value);
    Py_DECREF(value);
    return result;
}

/* sent_by_transport(records, skip_kind) -> {transport: count}: metrics.py's tally of a delivered batch, every
 * record but those of ``skip_kind`` (collections.Counter over (kind, transport) pairs was 2% of the CPU). */
static PyObject *
speedups_sent_by_transport(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "sent_by_transport(records: list, skip_kind)");
        return NULL;
    }
    PyObject *counts = PyDict_New();
    if (counts == NULL) {
        return NULL;
    }
    PyObject *last = NULL; /* borrowed from counts: the run's transport, and its count so far */
    Py_ssize_t run = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(args[0]); i++) {
        PyObject *record = PyList_GET_ITEM(args[0], i);
        PyObject *kind = GETATTR(record, kind_name);
        if (kind == NULL) {
            goto error;
        }
        Py_DECREF(kind); /* only its identity is compared */
        if (kind == args[1]) {
            continue;
        }
        PyObject *transport = GETATTR(record, transport_name); /* record: still in the list */
        if (transport == NULL) {
            goto error;
        }
        if (transport != last) { /* records of one transport come in runs: the dict is touched per run */
            if (last != NULL && add_count(counts, last, run) < 0) {
                Py_DECREF(transport);
                goto error;
            }
            Py_XDECREF(last);
            last = transport;
            run = 0;
        } else {
            Py_DECREF(transport);
        }
        run++;
    }
    if (last != NULL && add_count(counts, last, run) < 0) {
        goto error;
    }
    Py_XDECREF(last);
    return counts;
error:
    Py_XDECREF(last);
    Py_DECREF(counts);
    return NULL;
}

/* acks_delivered(acks, delivered) -> (packet_ids, received_at): mqtt/session.py's AckQueue.pop_delivered. Pops
 * the entries (packet_id, answer, received_at) at the head of the deque ``acks`` while packet_id is not 0 and
 * answer is 0 or a done future whose result is ``delivered``; received_at of the last one popped (-1.0 when
 * none). It stops at anything else, which the Python code answers. */
static PyObject *
speedups_acks_delivered(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "acks_delivered(acks: deque, delivered)");
        return NULL;
    }
    PyObject *acks = args[0], *delivered = args[1];
    PyObject *ids = PyList_New(0);
    if (ids == NULL) {
        return NULL;
    }
    PyObject *last_at = NULL;
    PyObject *popleft = PyObject_GetAttr(acks, popleft_name); /* bound once: a call per entry, no lookup */
    if (popleft == NULL) {
        Py_DECREF(ids);
        return NULL;
    }
    for (;;) {
        Py_ssize_t size = PySequence_Size(acks);
        if (size < 0) {
            goto error;
        }
        if (size == 0) {
            break;
        }
        PyObject *entry = PySequence_GetItem(acks, 0);
        if (entry == NULL) {
            goto error;
        }
        if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 3) {
            Py_DECREF(entry);
            break;
        }
        PyObject *id = PyTuple_GET_ITEM(entry, 0), *answer = PyTuple_GET_ITEM(entry, 1);
        int take = PyLong_CheckExact(id) && PyObject_IsTrue(id) == 1;
        if (take && PyLong_CheckExact(answer)) {
            take = PyLong_AsLong(answer) == 0 && !PyErr_Occurred();
        } else if (take) {
            PyObject *done = PyObject_CallMethodNoArgs(answer, done_name);
            take = done == Py_True;
            Py_XDECREF(done);
            if (take) {
                PyObject *result = PyObject_CallMethodNoArgs(answer, result_name);
                take = result == delivered;
                Py_XDECREF(result);
            }
        }
        if (PyErr_Occurred()) {
            Py_DECREF(entry);
            goto error;
        }
        if (!take) {
            Py_DECREF(entry);
            break;
        }
        PyObject *popped = PyObject_CallNoArgs(popleft);
        Py_XDECREF(popped);
        if (popped == NULL || PyList_Append(ids, id) < 0) {
            Py_DECREF(entry);
            goto error;
        }
        Py_XDECREF(last_at);
        last_at = Py_NewRef(PyTuple_GET_ITEM(entry, 2));
        Py_DECREF(entry);
    }
    Py_DECREF(popleft);
    if (last_at == NULL) {
        last_at = PyFloat_FromDouble(-1.0);
        if (last_at == NULL) {
            Py_DECREF(ids);
            return NULL;
        }
    }
    return Py_BuildValue("(NN)", ids, last_at);
error:
    Py_DECREF(popleft);
    Py_XDECREF(last_at);
    Py_DECREF(ids);
    return NULL;
}

/* settle_delivered(tickets) -> [ticket, ...]: pipeline.py's _settle_batch for a batch whose every record was
 * delivered. Each ticket (one per record, a message's ticket once per record) counts one record settled;
 * one that reaches 0 is resolved with its outcome unless already done. Returned, in batch order, are the
 * tickets that have callbacks waiting (``then``), as often as they appear: the Python code runs those of
 * the done ones, once. */
static PyObject *
speedups_settle_delivered(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1 || !PyList_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "settle_delivered(tickets: list)");
        return NULL;
    }
    PyObject *waiting = PyList_New(0);
    if (waiting == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(args[0]); i++) {
        PyObject *ticket = PyList_GET_ITEM(args[0], i);
        Py_INCREF(ticket);
        PyObject *pending = GETATTR(ticket, pending_name);
        long left = pending == NULL ? -1 : PyLong_AsLong(pending) - 1;
        Py_XDECREF(pending);
        PyObject *now = left < 0 || PyErr_Occurred() ? NULL : PyLong_FromLong(left);
        int failed = now == NULL || SETATTR(ticket, pending_name, now) < 0;
        Py_XDECREF(now);
        if (!failed && left == 0) {
            PyObject *done = CALL0(ticket, done_name);
            failed = done == NULL;
            if (done == Py_False) {
                PyObject *outcome = GETATTR(ticket, outcome_name);
                PyObject *set = outcome == NULL ? NULL : CALL1(ticket, set_result_name, outcome);
                failed = set == NULL;
                Py_XDECREF(outcome);
                Py_XDECREF(set);
            }
            Py_XDECREF(done);
        }
        if (!failed) { /* then is only changed by Python code, which does not run in this loop */
            PyObject *then = GETATTR(ticket, then_name);
            failed = then == NULL || (then != Py_None && PyList_Append(waiting, ticket) < 0);
            Py_XDECREF(then);
        }
        Py_DECREF(ticket);
        if (failed) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_ValueError, "settle_delivered: a ticket with no record pending");
            }
            Py_DECREF(waiting);
            return NULL;
        }
    }
    return waiting;
}

/* long_fraction(payload: bytes) -> bool: a '.' followed by more than 16 digits somewhere (normalize.py's
 * _LONG_FRACTION, a regular expression search that costs 7x this on a 60-byte payload). */
int
has_long_fraction(const char *data, Py_ssize_t size)
{
    const char *dot = data, *end = data + size;
    while ((dot = memchr(dot, '.', (size_t)(end - dot))) != NULL) {
        const char *digit = ++dot;
        while (digit < end && *digit >= '0' && *digit <= '9' && digit - dot < 17) {
            digit++;
        }
        if (digit - dot == 17) {
            return 1;
        }
    }
    return 0;
}

static PyObject *
speedups_long_fraction(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "long_fraction(payload: bytes)");
        return NULL;
    }
    return PyBool_FromLong(has_long_fraction(PyBytes_AS_STRING(args[0]), PyBytes_GET_SIZE(args[0])));
}

/* http_post(data, max_head) -> (target, body) | None: the HTTP fast lane of http/connection.py.
 *
 * A result only when ``data`` is exactly one complete request of a strict subset of HTTP/1.1 that
 * httptools (llhttp) reads the same way: "POST <origin-form target of RFC 3986 characters> HTTP/1.1", header
 * lines of token names and visible-ASCII values, one Content-Length of digits that the body fills exactly,
 * none of Transfer-Encoding, Connection, Proxy-Connection, Expect or Upgrade, the head within max_head
 * bytes. Everything else (and any doubt) is None: the connection feeds httptools as before.
 * tests/test_http_fast.py checks every answer against httptools on generated requests. */
static unsigned char target_chars[256], token_chars[256];

static void
http_tables_init(void)
{
    const char *target = "-._~!$&'()*+,;=:@/?%";
    const char *token = "!#$%&'*+-.^_`|~";
    for (int c = 0; c < 256; c++) {
        int alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
        target_chars[c] = alnum || (c && strchr(target, c) != NULL);
        token_chars[c] = alnum || (c && strchr(token, c) != NULL);
    }
}

/* header names the fast lane leaves to httptools; lower case */
static const char *const slow_headers[] = {"transfer-encoding", "connection", "proxy-connection", "expect", "upgrade"};

static int
name_is(const char *name, Py_ssize_t length, const char *lower)
{
    if ((Py_ssize_t)strlen(lower) != length) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < length; i++) {
        char c = name[i];
        if (c >= 'A' && c <= 'Z') {
            c = (char)(c - 'A' + 'a');
        }
        if (c != lower[i]) {
            return 0;
        }
    }
    return 1;
}

/* 1 when data[:size] is one whole simple POST (above): its target is data[5:*target], its body
 * data[*body:size]; 0 otherwise. Shared with _lanes.c. */
int
http_post_parse(const char *data, Py_ssize_t size, Py_ssize_t max_head, Py_ssize_t *target, Py_ssize_t *body)
{
    Py_ssize_t end = size < max_head ? size : max_head; /* the head must end within this */
    if (end < 6 || memcmp(data, "POST /", 6) != 0) {
        return 0;
    }
    Py_ssize_t at = 5;
    while (at < end && target_chars[(unsigned char)data[at]]) {
        at++;
    }
    Py_ssize_t target_end = at;
    if (end - at < 11 || memcmp(data + at, " HTTP/1.1\r\n", 11) != 0) {
        return 0;
    }
    at += 11;
    long long length = -1;
    for (;;) {
        if (end - at < 2) {
            return 0;
        }
        if (data[at] == '\r') {
            if (data[at + 1] != '\n') {
                return 0;
            }
            at += 2;
            break; /* the empty line: end of the head */
        }
        Py_ssize_t name = at;
        while (at < end && token_chars[(unsigned char)data[at]]) {
            at++;
        }
        Py_ssize_t name_length = at - name;
        if (name_length == 0 || at >= end || data[at] != ':') {
            return 0; /* no name, a space before the colon, obs-fold, a bare LF, ... */
        }
        at++;
        while (at < end && (data[at] == ' ' || data[at] == '\t')) {
            at++;
        }
        Py_ssize_t value = at, value_end = at;
        while (at < end && ((data[at] >= 0x21 && data[at] <= 0x7e) || data[at] == ' ' || data[at] == '\t')) {
            if (data[at] != ' ' && data[at] != '\t') {
                value_end = at + 1;
            }
            at++;
        }
        if (end - at < 2 || data[at] != '\r' || data[at + 1] != '\n') {
            return 0; /* a control character or obs-text in the value, or the head is cut */
        }
        at += 2;
        if (name_is(data + name, name_length, "content-length")) {
            if (length >= 0 || value_end == value || value_end - value > 9) {
                return 0; /* twice, empty, or longer than any payload limit */
            }
            length = 0;
            for (Py_ssize_t i = value; i < value_end; i++) {
                if (data[i] < '0' || data[i] > '9') {
                    return 0;
                }
                length = length * 10 + (data[i] - '0');
            }
            continue;
        }
        for (size_t i = 0; i < sizeof slow_headers / sizeof *slow_headers; i++) {
            if (name_is(data + name, name_length, slow_headers[i])) {
                return 0;
            }
        }
    }
    if (length < 0 || size - at != length) {
        return 0;
    }
    *target = target_end;
    *body = at;
    return 1;
}


static PyObject *
speedups_http_post(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "http_post(data: bytes, max_head: int)");
        return NULL;
    }
    Py_ssize_t max_head = PyLong_AsSsize_t(args[1]);
    if (max_head == -1 && PyErr_Occurred()) {
        return NULL;
    }
    const char *data = PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]), target, body;
    if (!http_post_parse(data, size, max_head, &target, &body)) {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(y#y#)", data + 5, target - 5, data + body, size - body);
}

/* maker(cls, fields, defaults) -> a callable that builds a ``cls`` from positional arguments by filling its
 * slots directly (construct.py): a slots dataclass's generated __init__ is a Python frame and an attribute
 * store per field, 650 ns for a Record here against about 60. Only for plain slots classes: every field a
 * writable object slot of ``cls`` itself, no __dict__; construct.py checks there is no __post_init__ or
 * other logic in __init__ to skip. ``defaults`` fill the trailing fields left out, as in the dataclass. */
typedef struct {
    PyObject_HEAD
    PyTypeObject *cls;
    PyObject *defaults; /* tuple: the values of the last len(defaults) fields when left out */
    Py_ssize_t nfields;
    Py_ssize_t nrequired;
    Py_ssize_t *offsets;
    vectorcallfunc vectorcall;
} MakerObject;

static PyObject *
maker_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    MakerObject *m = (MakerObject *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0) {
        PyErr_Format(PyExc_TypeError, "%s maker takes positional arguments only", m->cls->tp_name);
        return NULL;
    }
    if (nargs < m->nrequired || nargs > m->nfields) {
        PyErr_Format(PyExc_TypeError, "%s maker takes %zd to %zd arguments (%zd given)", m->cls->tp_name,
                     m->nrequired, m->nfields, nargs);
        return NULL;
    }
    PyObject *obj = m->cls->tp_alloc(m->cls, 0);
    if (obj == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < m->nfields; i++) {
        PyObject *value = i < nargs ? args[i] : PyTuple_GET_ITEM(m->defaults, i - m->nrequired);
        Py_INCREF(value);
        *(PyObject **)((char *)obj + m->offsets[i]) = value;
    }
    return obj;
}

static void
maker_dealloc(MakerObject *m)
{
    Py_XDECREF(m->cls);
    Py_XDECREF(m->defaults);
    PyMem_Free(m->offsets);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static PyTypeObject MakerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tb_gateway._speedups.Maker",
    .tp_basicsize = sizeof(MakerObject),
    .tp_dealloc = (destructor)maker_dealloc,
    .tp_vectorcall_offset = offsetof(MakerObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Builds an instance of a plain slots class from positional arguments (maker())",
};

/* Poller(finished, drain): a callback sink's poll() as transports call it at every read (sinks/store.py):
 * drain() only when the deque of finished writes holds something, so the usual read (nothing finished) costs
 * a length check instead of a Python frame. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *finished; /* collections.deque */
    PyObject *drain;
} PollerObject;

static PyObject *
poller_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PollerObject *self = (PollerObject *)callable;
    if (PyVectorcall_NARGS(nargsf) != 0 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError, "poll() takes no arguments");
        return NULL;
    }
    Py_ssize_t waiting = PyObject_Length(self->finished);
    if (waiting < 0) {
        return NULL;
    }
    return waiting == 0 ? Py_NewRef(Py_None) : PyObject_CallNoArgs(self->drain);
}

static PyObject *
poller_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *finished, *drain;
    if ((kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) || !PyArg_ParseTuple(args, "OO:Poller", &finished, &drain)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "Poller(finished, drain) takes positional arguments only");
        }
        return NULL;
    }
    PollerObject *self = (PollerObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->finished = Py_NewRef(finished);
    self->drain = Py_NewRef(drain);
    self->vectorcall = poller_vectorcall;
    return (PyObject *)self;
}

static int
poller_traverse(PollerObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->finished);
    Py_VISIT(self->drain);
    return 0;
}

static int
poller_clear(PollerObject *self)
{
    Py_CLEAR(self->finished);
    Py_CLEAR(self->drain);
    return 0;
}

static void
poller_dealloc(PollerObject *self)
{
    PyObject_GC_UnTrack(self);
    poller_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject PollerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tb_gateway._speedups.Poller",
    .tp_basicsize = sizeof(PollerObject),
    .tp_dealloc = (destructor)poller_dealloc,
    .tp_vectorcall_offset = offsetof(PollerObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)poller_traverse,
    .tp_clear = (inquiry)poller_clear,
    .tp_new = poller_new,
    .tp_doc = "poll(): drain() when finished (a deque) is not empty (sinks/store.py)",
};

static PyObject *
speedups_maker(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyType_Check(args[0]) || !PyTuple_Check(args[1]) || !PyTuple_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "maker(cls: type, fields: tuple[str, ...], defaults: tuple)");
        return NULL;
    }
    PyTypeObject *cls = (PyTypeObject *)args[0];
    Py_ssize_t nfields = PyTuple_GET_SIZE(args[1]), ndefaults = PyTuple_GET_SIZE(args[2]);
    if (cls->tp_dictoffset != 0 || cls->tp_itemsize != 0 || ndefaults > nfields || cls->tp_alloc == NULL) {
        PyErr_Format(PyExc_TypeError, "%s: not a plain slots class", cls->tp_name);
        return NULL;
    }
    Py_ssize_t *offsets = PyMem_Calloc((size_t)nfields + 1, sizeof(Py_ssize_t));
    if (offsets == NULL) {
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < nfields; i++) {
        PyObject *name = PyTuple_GET_ITEM(args[1], i);
        PyObject *descr = PyUnicode_Check(name) ? PyDict_GetItemWithError(cls->tp_dict, name) : NULL;
        PyMemberDef *member = NULL;
        if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
            member = ((PyMemberDescrObject *)descr)->d_member;
        }
        if (member == NULL || member->type != T_OBJECT_EX || (member->flags & READONLY) || member->offset <= 0 ||
            member->offset + (Py_ssize_t)sizeof(PyObject *) > cls->tp_basicsize) {
            PyMem_Free(offsets);
            if (!PyErr_Occurred()) {
                PyErr_Format(PyExc_TypeError, "%s: field %R is not a writable object slot of the class itself",
                             cls->tp_name, name);
            }
            return NULL;
        }
        offsets[i] = member->offset;
    }
    MakerObject *m = PyObject_New(MakerObject, &MakerType);
    if (m == NULL) {
        PyMem_Free(offsets);
        return NULL;
    }
    Py_INCREF(cls);
    Py_INCREF(args[2]);
    m->cls = cls;
    m->defaults = args[2];
    m->nfields = nfields;
    m->nrequired = nfields - ndefaults;
    m->offsets = offsets;
    m->vectorcall = maker_vectorcall;
    return (PyObject *)m;
}

/* now_ms() -> int: wall-clock milliseconds, time.time_ns() // 1_000_000 (the same CLOCK_REALTIME reading)
 * without a Python frame: the transports stamp every read with it (clock.py). */
static PyObject *
speedups_now_ms(PyObject *self, PyObject *unused)
{
    struct timespec now;
    if (clock_gettime(CLOCK_REALTIME, &now) != 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    long long ms = (long long)now.tv_sec * 1000 + now.tv_nsec / 1000000;
    if (now.tv_sec < 0 && now.tv_nsec % 1000000) {
        ms -= 1; /* floor division before 1970, as Python's // */
    }
    return PyLong_FromLongLong(ms);
}

static PyMethodDef methods[] = {
    {"now_ms", speedups_now_ms, METH_NOARGS, "now_ms() -> int: time.time_ns() // 1_000_000"},
    {"frame", (PyCFunction)(void (*)(void))speedups_frame, METH_FASTCALL,
     "frame(payloads, index, offset, seq, crc, room) -> (bytes, index, offset, seq, crc): segments.frame() "
     "for as many entries as fit"},
    {"values", (PyCFunction)(void (*)(void))speedups_values, METH_FASTCALL,
     "values(raw, type_cast, max_string_length) -> dict | None: typed values, or None to ask normalize.py"},
    {"telemetry", (PyCFunction)(void (*)(void))speedups_telemetry, METH_FASTCALL,
     "telemetry(document, now_ms, type_cast, max_string_length) -> list | None: groups, or None to ask "
     "normalize.py"},
    {"append_durably", (PyCFunction)(void (*)(void))speedups_append_durably, METH_FASTCALL,
     "append_durably(lock_fd, fd, data, offset) -> bool: flock, check the tail, pwrite, fdatasync, unlock "
     "(False: another writer appended, nothing written)"},
    {"coap_decode", (PyCFunction)(void (*)(void))speedups_coap_decode, METH_FASTCALL,
     "coap_decode(data) -> (type, code, mid, token, options, payload) | None: codec.decode() for well-formed "
     "messages"},
    {"recv_datagrams", (PyCFunction)(void (*)(void))speedups_recv_datagrams, METH_FASTCALL,
     "recv_datagrams(fd) -> [(data, address), ...]: one recvmmsg on a non-blocking socket"},
    {"send_datagrams", (PyCFunction)(void (*)(void))speedups_send_datagrams, METH_FASTCALL,
     "send_datagrams(fd, datagrams, start) -> index of the first datagram not sent (the socket is full)"},
    {"mqtt_publishes", (PyCFunction)(void (*)(void))speedups_mqtt_publishes, METH_FASTCALL,
     "mqtt_publishes(buf, pos, topics, v5, limit, publish) -> (packets, pos): a run of common QoS 1 PUBLISHes"},
    {"entry", (PyCFunction)(void (*)(void))speedups_entry, METH_FASTCALL,
     "entry(head, ts, values, tail, received_at) -> bytes | None: one embedded-store JSON line"},
    {"store_lines", (PyCFunction)(void (*)(void))speedups_store_lines, METH_FASTCALL,
     "store_lines(records, templates, dumps, encode) -> [bytes]: the embedded store's lines for a batch"},
    {"sent_by_transport", (PyCFunction)(void (*)(void))speedups_sent_by_transport, METH_FASTCALL,
     "sent_by_transport(records, skip_kind) -> {transport: count}: a delivered batch's tally"},
    {"acks_delivered", (PyCFunction)(void (*)(void))speedups_acks_delivered, METH_FASTCALL,
     "acks_delivered(acks, delivered) -> (packet_ids, received_at): the run of delivered acks at the head"},
    {"settle_delivered", (PyCFunction)(void (*)(void))speedups_settle_delivered, METH_FASTCALL,
     "settle_delivered(tickets) -> [ticket, ...]: settle a wholly delivered batch; the tickets with callbacks"},
    {"long_fraction", (PyCFunction)(void (*)(void))speedups_long_fraction, METH_FASTCALL,
     "long_fraction(payload) -> bool: a '.' followed by more than 16 digits"},
    {"maker", (PyCFunction)(void (*)(void))speedups_maker, METH_FASTCALL,
     "maker(cls, fields, defaults) -> callable building a cls by filling its slots directly"},
    {"http_post", (PyCFunction)(void (*)(void))speedups_http_post, METH_FASTCALL,
     "http_post(data, max_head) -> (target, body) | None: one whole simple POST, else ask httptools"},
    {NULL, NULL, 0, NULL},
};

#ifndef TB_SOURCES_SHA1 /* setup.py defines it: the hash of the sources this module was built from */
#define TB_SOURCES_SHA1 "unknown"
#endif

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "tb_gateway._speedups", "C fast path for normalize.py", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    crc_init();
    http_tables_init();
    if (PyType_Ready(&MakerType) < 0) {
        return NULL;
    }
    ts_name = PyUnicode_InternFromString("ts");
    values_name = PyUnicode_InternFromString("values");
    device_name = PyUnicode_InternFromString("device");
    kind_name = PyUnicode_InternFromString("kind");
    transport_name = PyUnicode_InternFromString("transport");
    received_at_name = PyUnicode_InternFromString("received_at");
    popleft_name = PyUnicode_InternFromString("popleft");
    done_name = PyUnicode_InternFromString("done");
    result_name = PyUnicode_InternFromString("result");
    pending_name = PyUnicode_InternFromString("pending");
    outcome_name = PyUnicode_InternFromString("outcome");
    then_name = PyUnicode_InternFromString("then");
    set_result_name = PyUnicode_InternFromString("set_result");
    tuple_by_raw = PyDict_New();
    raw_by_tuple = PyDict_New();
    if (ts_name == NULL || values_name == NULL || device_name == NULL || kind_name == NULL || transport_name == NULL ||
        received_at_name == NULL || popleft_name == NULL || done_name == NULL || result_name == NULL ||
        pending_name == NULL || outcome_name == NULL || then_name == NULL || set_result_name == NULL || tuple_by_raw == NULL || raw_by_tuple == NULL) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module != NULL && (PyModule_AddStringConstant(module, "SOURCES_SHA1", TB_SOURCES_SHA1) < 0 ||
                           PyType_Ready(&PollerType) < 0 || PyModule_AddType(module, &PollerType) < 0 ||
                           lanes_init(module) < 0 || mqtt_lane_init(module) < 0 ||
                           kafka_lane_init(module) < 0 || seen_init(module) < 0)) {
        Py_CLEAR(module);
    }
    return module;
}
