/* Optional C fast paths for the per-record hot spots: normalize.py (typing a payload's values) and
 * sinks/segments.py (framing store entries, which runs on the store's writer thread while it holds the GIL).
 *
 * The Python code stays the reference. The normalization functions handle only what is unambiguous and
 * answer None for anything else, so the Python rules run and produce every error message; framing is
 * byte for byte what segments.frame() writes. tests/test_normalize.py and tests/test_segments.py compare
 * both on generated input. Built by setup.py when a C compiler is present; without one, Python runs alone.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_KEY_LENGTH 255
#define HEADER_SIZE 16 /* segments.HEADER: "<IIQ" payload length, chained crc32, seq */

/* CRC-32 (IEEE 802.3, reflected 0xEDB88320), the same function as zlib.crc32. */
static uint32_t crc_table[256];

static void
crc_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) {
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        }
        crc_table[n] = c;
    }
}

static uint32_t
crc32_update(uint32_t crc, const unsigned char *data, Py_ssize_t n)
{
    crc = ~crc;
    for (Py_ssize_t i = 0; i < n; i++) {
        crc = crc_table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
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
fast_values(PyObject *raw, int type_cast, Py_ssize_t max_string)
{
    PyObject *values = PyDict_New();
    if (values == NULL) {
        return NULL;
    }
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(raw, &pos, &key, &value)) {
        if (!PyUnicode_CheckExact(key) || PyUnicode_GET_LENGTH(key) > MAX_KEY_LENGTH) {
            goto fallback;
        }
        if (value == Py_None) {
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
        if (PyDict_SetItem(values, key, value) < 0) {
            Py_DECREF(values);
            return NULL;
        }
    }
    return values;
fallback:
    Py_DECREF(values);
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
    PyObject *values = fast_values(args[0], type_cast, max_string);
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
    PyObject *values = fast_values(raw, type_cast, max_string);
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

static PyObject *ts_name, *values_name;

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
    PyObject *document = args[0], *now = args[1];
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
        if (rc < 0) {
            return NULL;
        }
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

static PyMethodDef methods[] = {
    {"frame", (PyCFunction)(void (*)(void))speedups_frame, METH_FASTCALL,
     "frame(payloads, index, offset, seq, crc, room) -> (bytes, index, offset, seq, crc): segments.frame() "
     "for as many entries as fit"},
    {"values", (PyCFunction)(void (*)(void))speedups_values, METH_FASTCALL,
     "values(raw, type_cast, max_string_length) -> dict | None: typed values, or None to ask normalize.py"},
    {"telemetry", (PyCFunction)(void (*)(void))speedups_telemetry, METH_FASTCALL,
     "telemetry(document, now_ms, type_cast, max_string_length) -> list | None: groups, or None to ask "
     "normalize.py"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "tb_gateway._speedups", "C fast path for normalize.py", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    crc_init();
    ts_name = PyUnicode_InternFromString("ts");
    values_name = PyUnicode_InternFromString("values");
    if (ts_name == NULL || values_name == NULL) {
        return NULL;
    }
    return PyModule_Create(&module_def);
}
