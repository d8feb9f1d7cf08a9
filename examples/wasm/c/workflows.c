/* The conformance workflows in C: the same behaviour as the Python ones in
 * clients/conformance/test_sandbox.py, for the raw `wasm` runtime.
 *
 * Build (offline, with the ziglang package from PyPI):
 *   python -m ziglang cc -target wasm32-freestanding -O2 -nostdlib -Wl,--no-entry \
 *       -o workflows.wasm workflows.c
 */
#include "tenantflow.h"

#define WASI(name) __attribute__((import_module("wasi_snapshot_preview1"), import_name(name)))
WASI("path_open") int wasi_path_open(int fd, int dirflags, const char *path, int path_len, int oflags,
                                     long long rights, long long inheriting, int fdflags, int *opened);
WASI("environ_sizes_get") int wasi_environ_sizes_get(int *count, int *size);

static long g_value;    /* input to the running step callback */
static long g_secret;   /* module state: must never outlive a run or reach another tenant */
static char g_path[1024];

static const char *event(void) { return tf_call("{\"op\":\"event\"}"); }

static int step_double(long attempt, tf_buf *out) { (void)attempt; tf_put_int(out, g_value * 2); return 1; }
static int step_add_one(long attempt, tf_buf *out) { (void)attempt; tf_put_int(out, g_value + 1); return 1; }

/* Steps: {"x": n} -> {"total": 2n + 1}, through two durable steps. */
TF_WORKFLOW(Steps) {
  g_value = tf_int(event(), "x", 0);
  const char *reply = tf_do("double", 0, step_double);
  if (!tf_is(reply, "return")) { tf_stop(reply, "double"); return; }
  g_value = tf_int(reply, "value", 0);
  reply = tf_do("add", 0, step_add_one);
  if (!tf_is(reply, "return")) { tf_stop(reply, "add"); return; }
  tf_buf out = {{0}, 0};
  tf_finish(tf_put(tf_put_int(tf_put(&out, "{\"total\":"), tf_int(reply, "value", 0)), "}")->data);
}

/* Sleeper: hibernates for 0.2 s, then returns "woke". */
TF_WORKFLOW(Sleeper) {
  const char *reply = tf_call("{\"op\":\"step\",\"kind\":\"sleep\",\"name\":\"nap\",\"seconds\":0.2}");
  if (!tf_is(reply, "return")) { tf_stop(reply, "nap"); return; }
  tf_finish("\"woke\"");
}

static int step_flaky(long attempt, tf_buf *out) {
  if (attempt < 2) { tf_put(out, "flaky"); return 0; }
  tf_put_int(out, attempt);
  return 1;
}

/* Retry: the first attempt fails, the second returns its attempt number (2). */
TF_WORKFLOW(Retry) {
  const char *reply = tf_do("flaky", "\"retries\":{\"limit\":2,\"delay\":0}", step_flaky);
  if (!tf_is(reply, "return")) { tf_stop(reply, "flaky"); return; }
  const char *value = tf_find(reply, "value");
  tf_buf out = {{0}, 0};
  tf_finish(tf_putn(&out, value, tf_value_len(value))->data);
}

/* Waiter: waits for an event of type "go" and returns its payload. */
TF_WORKFLOW(Waiter) {
  const char *reply = tf_call(
      "{\"op\":\"step\",\"kind\":\"wait\",\"name\":\"approval\",\"type\":\"go\",\"timeout\":30}");
  if (!tf_is(reply, "return")) { tf_stop(reply, "approval"); return; }
  const char *payload = tf_find(reply, "payload");
  tf_buf out = {{0}, 0};
  tf_finish(payload ? tf_putn(&out, payload, tf_value_len(payload))->data : "null");
}

static int step_boom(long attempt, tf_buf *out) { (void)attempt; tf_put(out, "boom"); return -1; }

/* Fails: a non-retryable step failure fails the workflow. */
TF_WORKFLOW(Fails) {
  tf_stop(tf_do("boom", 0, step_boom), "boom");
}

static int step_spin(long attempt, tf_buf *out) {
  (void)attempt; (void)out;
  for (volatile int i = 0;; i++) {}
  return 1;
}

static int step_bomb(long attempt, tf_buf *out) {
  (void)attempt; (void)out;
  while (__builtin_wasm_memory_grow(0, 16) != (__SIZE_TYPE__)-1) {}  /* 1 MiB at a time */
  __builtin_trap();  /* out of memory: what a C program's abort() does */
}

static int step_crash(long attempt, tf_buf *out) { (void)attempt; (void)out; __builtin_trap(); }

#define HOSTILE(Name, step, fn) \
  TF_WORKFLOW(Name) { tf_stop(tf_do(step, "\"retries\":{\"limit\":0}", fn), step); }
HOSTILE(Spin, "spin", step_spin)
HOSTILE(Bomb, "bomb", step_bomb)
HOSTILE(Crash, "crash", step_crash)

static int step_read(long attempt, tf_buf *out) {
  (void)attempt;
  int opened = -1, error = 0;
  for (int fd = 3; fd < 16 && opened < 0; fd++) {
    error = wasi_path_open(fd, 0, g_path, tf_strlen(g_path), 0, 2 /* fd_read */, 0, 0, &opened);
    if (error) opened = -1;
  }
  if (opened >= 0) tf_put(out, "\"read\"");
  else tf_put_int(tf_put(out, "\"denied: errno "), error), tf_put(out, "\"");
  return 1;
}

/* ReadFile: tries to open {"path": ...} through any WASI descriptor; returns "denied: ..." or "read". */
TF_WORKFLOW(ReadFile) {
  const char *path = tf_find(event(), "path");
  int n = path ? tf_value_len(path) - 2 : 0;
  for (int i = 0; i < n && i < (int)sizeof g_path - 1; i++) g_path[i] = path[i + 1];
  const char *reply = tf_do("read", "\"retries\":{\"limit\":0}", step_read);
  if (!tf_is(reply, "return")) { tf_stop(reply, "read"); return; }
  const char *value = tf_find(reply, "value");
  tf_buf out = {{0}, 0};
  tf_finish(tf_putn(&out, value, tf_value_len(value))->data);
}

static int step_env(long attempt, tf_buf *out) {
  (void)attempt;
  int count = 0, size = 0;
  wasi_environ_sizes_get(&count, &size);
  if (count == 0) tf_put(out, "[]");
  else tf_put(tf_put_int(tf_put(out, "[\""), count), " variables\"]");
  return 1;
}

/* Env: the names of the environment variables the guest can see (none). */
TF_WORKFLOW(Env) {
  const char *reply = tf_do("env", "\"retries\":{\"limit\":0}", step_env);
  if (!tf_is(reply, "return")) { tf_stop(reply, "env"); return; }
  const char *value = tf_find(reply, "value");
  tf_buf out = {{0}, 0};
  tf_finish(tf_putn(&out, value, tf_value_len(value))->data);
}

/* SetGlobal / ReadGlobal: module state set by one run is not seen by the next, or by anyone else. */
TF_WORKFLOW(SetGlobal) {
  g_secret = tf_int(event(), "x", 1);
  tf_finish("null");
}

TF_WORKFLOW(ReadGlobal) {
  tf_buf out = {{0}, 0};
  tf_finish(g_secret ? tf_put_int(&out, g_secret)->data : "null");
}
