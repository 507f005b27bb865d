/* What _speedups.c shares with _lanes.c (one extension module, two source files). */
#ifndef TB_GATEWAY_SPEEDUPS_H
#define TB_GATEWAY_SPEEDUPS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

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

#endif
