/* What _speedups.c shares with _lanes.c (one extension module, two source files). */
#ifndef TB_GATEWAY_SPEEDUPS_H
#define TB_GATEWAY_SPEEDUPS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

/* ---- Attribute inline caches: what CPython's specializer does for LOAD_ATTR, for the C lanes' call sites ----
 *
 * PyObject_GetAttr finds a name through the type's method cache (a global table: a cache miss on most
 * requests) and then the descriptor or the instance dict; the lanes make some forty such lookups a message.
 * A site's cache remembers, for one type (and its version tag: any change to the type or its bases makes a
 * new tag), where the attribute lives: a __slots__ member's offset, or the instance dict (no data descriptor
 * of that name on the type). The lookup is then a load, or one dict lookup; anything else (another type, a
 * modified type, a custom __getattribute__ or __setattr__, an attribute not there) takes the generic call,
 * so the answer is always Python's. The instance-dict form materializes the dict of objects stored inline
 * (3.11's managed dicts): used only on long-lived objects (servers, the pipeline, the API).
 */
typedef struct {
    PyTypeObject *type; /* not owned: (type, version) is unique for the interpreter's life */
    unsigned int version;
    Py_ssize_t offset; /* > 0: the slot at this offset; 0: the instance dict */
} AttrCache;

static inline int
attr_cache_hit(const AttrCache *cache, PyTypeObject *type)
{
    return type == cache->type && type->tp_version_tag == cache->version &&
           (type->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG);
}

static void
attr_cache_fill(AttrCache *cache, PyTypeObject *type, PyObject *name, int for_set)
{
    cache->type = NULL;
    if (type->tp_getattro != PyObject_GenericGetAttr ||
        (for_set && type->tp_setattro != PyObject_GenericSetAttr) || !PyUnicode_CheckExact(name)) {
        return;
    }
    PyObject *descr = _PyType_Lookup(type, name); /* borrowed; assigns the version tag */
    if (!(type->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG)) {
        return;
    }
    if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type != T_OBJECT_EX || member->offset <= 0 || (for_set && (member->flags & READONLY))) {
            return;
        }
        cache->offset = member->offset;
    }
    else if (descr == NULL || Py_TYPE(descr)->tp_descr_set == NULL) { /* the instance dict decides */
        if (!(type->tp_flags & Py_TPFLAGS_MANAGED_DICT) && type->tp_dictoffset == 0) {
            return;
        }
        if (for_set && descr != NULL) {
            return; /* setting shadows a class attribute: rare, and the generic call does it */
        }
        cache->offset = 0;
    }
    else {
        return; /* a property or another data descriptor: the generic call runs it */
    }
    cache->type = type;
    cache->version = type->tp_version_tag;
}

/* obj.name as a new reference, or NULL with an error (PyObject_GetAttr's contract) */
static inline PyObject *
cached_getattr(AttrCache *cache, PyObject *obj, PyObject *name)
{
    PyTypeObject *type = Py_TYPE(obj);
    if (attr_cache_hit(cache, type)) {
        if (cache->offset > 0) {
            PyObject *value = *(PyObject **)((char *)obj + cache->offset);
            if (value != NULL) {
                return Py_NewRef(value);
            }
        }
        else {
            PyObject **dict = _PyObject_GetDictPtr(obj);
            if (dict != NULL && *dict != NULL) {
                PyObject *value = PyDict_GetItemWithError(*dict, name);
                if (value != NULL) {
                    return Py_NewRef(value);
                }
                if (PyErr_Occurred()) {
                    return NULL;
                }
            }
        }
    }
    else {
        attr_cache_fill(cache, type, name, 0);
    }
    return PyObject_GetAttr(obj, name);
}

/* obj.name = value: 0, or -1 with an error (PyObject_SetAttr's contract) */
static inline int
cached_setattr(AttrCache *cache, PyObject *obj, PyObject *name, PyObject *value)
{
    PyTypeObject *type = Py_TYPE(obj);
    if (attr_cache_hit(cache, type)) {
        if (cache->offset > 0) {
            PyObject **slot = (PyObject **)((char *)obj + cache->offset);
            PyObject *old = *slot;
            *slot = Py_NewRef(value);
            Py_XDECREF(old);
            return 0;
        }
        PyObject **dict = _PyObject_GetDictPtr(obj);
        if (dict != NULL && *dict != NULL) {
            return PyDict_SetItem(*dict, name, value);
        }
    }
    else {
        attr_cache_fill(cache, type, name, 1);
    }
    return PyObject_SetAttr(obj, name, value);
}

/* The same for a method call, obj.name(args...): the type's function or method descriptor, called with obj
 * first, as _PyObject_GetMethod + vectorcall would, when the instance has no dict that could shadow it. */
typedef struct {
    PyTypeObject *type;
    unsigned int version;
    PyObject *method; /* owned */
} MethodCache;

static inline int
method_cache_usable(const MethodCache *cache, PyObject *obj)
{
    PyTypeObject *type = Py_TYPE(obj);
    if (type != cache->type || type->tp_version_tag != cache->version ||
        !(type->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG)) {
        return 0;
    }
    Py_ssize_t offset = type->tp_dictoffset; /* a dict (none yet on the usual objects) could hold the name */
    return offset == 0 || (offset > 0 && *(PyObject **)((char *)obj + offset) == NULL);
}

static void
method_cache_fill(MethodCache *cache, PyObject *obj, PyObject *name)
{
    PyTypeObject *type = Py_TYPE(obj);
    cache->type = NULL;
    if (type->tp_getattro != PyObject_GenericGetAttr || (type->tp_flags & Py_TPFLAGS_MANAGED_DICT) ||
        type->tp_dictoffset < 0 || !PyUnicode_CheckExact(name)) {
        return;
    }
    PyObject *descr = _PyType_Lookup(type, name);
    if (descr == NULL || !(Py_TYPE(descr)->tp_flags & Py_TPFLAGS_METHOD_DESCRIPTOR) ||
        !(type->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG)) {
        return;
    }
    Py_XSETREF(cache->method, Py_NewRef(descr));
    cache->type = type;
    cache->version = type->tp_version_tag;
}

/* obj.name(*args) for nargs 0 or 1 (args[0] is then the argument): PyObject_VectorcallMethod's contract */
static inline PyObject *
cached_call(MethodCache *cache, PyObject *obj, PyObject *name, PyObject *arg)
{
    PyObject *stack[2] = {obj, arg};
    size_t nargs = arg == NULL ? 1 : 2;
    if (!method_cache_usable(cache, obj)) {
        method_cache_fill(cache, obj, name);
        return PyObject_VectorcallMethod(name, stack, nargs | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    }
    return PyObject_Vectorcall(cache->method, stack, nargs, NULL);
}

/* One cache per call site (a static in a GNU statement expression): GETATTR(obj, name), SETATTR(obj, name, v) */
#define GETATTR(obj, name) __extension__({ static AttrCache site_; cached_getattr(&site_, (obj), (name)); })
#define SETATTR(obj, name, value) \
    __extension__({ static AttrCache site_; cached_setattr(&site_, (obj), (name), (value)); })
/* CALL0(obj, name) is obj.name(), CALL1(obj, name, arg) obj.name(arg), each with its call site's cache */
#define CALL0(obj, name) __extension__({ static MethodCache site_; cached_call(&site_, (obj), (name), NULL); })
#define CALL1(obj, name, arg) __extension__({ static MethodCache site_; cached_call(&site_, (obj), (name), (arg)); })

/* normalize.py's telemetry() groups for a parsed document; NULL without an error: ask normalize.py */
PyObject *telemetry_groups(PyObject *document, PyObject *now, int type_cast, Py_ssize_t max_string);
/* a '.' followed by more than 16 digits: normalize.py parses such a payload keeping the literals */
int has_long_fraction(const char *data, Py_ssize_t size);
/* one whole simple POST (http/connection.py's fast lane): target data[5:*target], body data[*body:] */
int http_post_parse(const char *data, Py_ssize_t size, Py_ssize_t max_head, Py_ssize_t *target, Py_ssize_t *body);

/* coap_decode(data) -> (type, code, mid, token, options, payload) | None (coap/codec.py's fast path) */
PyObject *speedups_coap_decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

/* _lanes.c: adds its types to the module */
int lanes_init(PyObject *module);
/* _lanes.c, shared with _mqtt_lane.c: Downlink.activity(device, transport, now) with its hot path in C */
int mark_active(PyObject *downlink, PyObject *device, PyObject *transport, PyObject *now);
/* _lanes.c, shared with _mqtt_lane.c: a latency histogram child's observe(seconds) */
int observe_seconds(PyObject *child, double value);

/* _mqtt_lane.c: adds its types to the module */
int mqtt_lane_init(PyObject *module);

/* _kafka_lane.c: adds its types and functions to the module */
int kafka_lane_init(PyObject *module);

/* _seen.c: SeenTable, the CoAP endpoint's de-duplication table; what the CoAP lane calls on it */
int seen_init(PyObject *module);
int seen_table_check(PyObject *obj);
PyObject *seen_table_lookup(PyObject *table, PyObject *peer, unsigned int mid); /* borrowed; NULL: none */
int seen_table_put(PyObject *table, PyObject *peer, unsigned int mid, PyObject *value, double now, double lifetime);
int seen_table_replace(PyObject *table, PyObject *peer, unsigned int mid, PyObject *old, PyObject *new);

/* _speedups.c: a tuple of n new references (stolen); NULL, with every item released, if any item is NULL */
PyObject *tuple_steal(Py_ssize_t n, PyObject **items);

#endif
