/* tenantflow guest ABI for C (freestanding: no libc needed). See plugins/sandbox_wasm/ABI.md.
 *
 * A workflow is an exported function `workflow_<Name>(void)`. It talks to the kernel with JSON
 * requests through tf_call(); every reply is {"do": "run"|"return"|"raise"|"suspend"|"exit"|"ack", ...}.
 * On "suspend" or "exit" the workflow must return at once: the kernel runs it again from the top
 * at the next wake-up, answering recorded steps from the journal.
 */
#ifndef TENANTFLOW_H
#define TENANTFLOW_H

#define TF_IMPORT(name) __attribute__((import_module("tenantflow"), import_name(name)))
#define TF_WORKFLOW(name) __attribute__((export_name("workflow_" #name))) void workflow_##name(void)

TF_IMPORT("call") int tf_host_call(const char *request, int length);
TF_IMPORT("reply") void tf_host_reply(char *destination);
TF_IMPORT("log") void tf_host_log(const char *line, int length);

#define TF_REPLY_MAX 65536
static char tf_reply_buffer[TF_REPLY_MAX];

static int tf_strlen(const char *s) { int n = 0; while (s[n]) n++; return n; }

static int tf_starts(const char *s, const char *prefix) {
  while (*prefix) if (*s++ != *prefix++) return 0;
  return 1;
}

/* Send one JSON request; returns the reply (valid until the next tf_call). */
static const char *tf_call(const char *request) {
  int n = tf_host_call(request, tf_strlen(request));
  if (n < 0 || n >= TF_REPLY_MAX) __builtin_trap();
  tf_host_reply(tf_reply_buffer);
  tf_reply_buffer[n] = 0;
  return tf_reply_buffer;
}

static void tf_log(const char *line) { tf_host_log(line, tf_strlen(line)); }

/* Find `"key":` in a JSON text and return where its value starts (0 if absent). */
static const char *tf_find(const char *json, const char *key) {
  int k = tf_strlen(key);
  for (const char *p = json; *p; p++) {
    if (p[0] == '"' && tf_starts(p + 1, key) && p[k + 1] == '"' && p[k + 2] == ':') {
      p += k + 3;
      while (*p == ' ') p++;
      return p;
    }
  }
  return 0;
}

/* The length of the JSON value starting at `v` (string, number, literal, object or array). */
static int tf_value_len(const char *v) {
  int depth = 0, i = 0, in_string = 0;
  for (; v[i]; i++) {
    char c = v[i];
    if (in_string) {
      if (c == '\\') i++;
      else if (c == '"') { in_string = 0; if (depth == 0) return i + 1; }
    } else if (c == '"') in_string = 1;
    else if (c == '{' || c == '[') depth++;
    else if (c == '}' || c == ']') { if (depth == 0) return i; if (--depth == 0) return i + 1; }
    else if (c == ',' && depth == 0) return i;
  }
  return i;
}

static long tf_int(const char *json, const char *key, long fallback) {
  const char *p = tf_find(json, key);
  if (!p) return fallback;
  long sign = 1, n = 0;
  if (*p == '-') { sign = -1; p++; }
  while (*p >= '0' && *p <= '9') n = n * 10 + (*p++ - '0');
  return sign * n;
}

/* What the kernel told us to do: the reply's "do" value. */
static int tf_is(const char *reply, const char *action) {
  const char *p = tf_find(reply, "do");
  return p && *p == '"' && tf_starts(p + 1, action) && p[1 + tf_strlen(action)] == '"';
}

/* A tiny string builder for requests. */
typedef struct { char data[8192]; int len; } tf_buf;

static tf_buf *tf_put(tf_buf *b, const char *s) {
  while (*s && b->len < (int)sizeof b->data - 1) b->data[b->len++] = *s++;
  b->data[b->len] = 0;
  return b;
}

static tf_buf *tf_putn(tf_buf *b, const char *s, int n) {
  for (int i = 0; i < n && b->len < (int)sizeof b->data - 1; i++) b->data[b->len++] = s[i];
  b->data[b->len] = 0;
  return b;
}

static tf_buf *tf_put_int(tf_buf *b, long v) {
  char digits[24];
  int n = 0;
  if (v < 0) { tf_put(b, "-"); v = -v; }
  do { digits[n++] = (char)('0' + v % 10); v /= 10; } while (v);
  while (n) { char c[2] = {digits[--n], 0}; tf_put(b, c); }
  return b;
}

/* -- steps ------------------------------------------------------------------------------------ */

/* A step callback: write the result as a JSON value to `out` and return 1, or write an error
 * message (no quotes) and return 0 (retryable) or -1 (non-retryable). */
typedef int (*tf_step_fn)(long attempt, tf_buf *out);

/* Run step `name` (`options`: extra JSON members such as "retries":{...}, or 0). Returns the
 * final reply: "return" (with "value"), "raise" (with "error"), or "suspend"/"exit". */
static const char *tf_do(const char *name, const char *options, tf_step_fn fn) {
  tf_buf request = {{0}, 0};
  tf_put(tf_put(tf_put(&request, "{\"op\":\"step\",\"kind\":\"do\",\"name\":\""), name), "\"");
  if (options) tf_put(tf_put(&request, ","), options);
  const char *reply = tf_call(tf_put(&request, "}")->data);
  while (tf_is(reply, "run")) {
    tf_buf out = {{0}, 0}, result = {{0}, 0};
    int ok = fn(tf_int(reply, "attempt", 1), &out);
    if (ok == 1) {
      tf_put(tf_put(tf_put(&result, "{\"op\":\"result\",\"ok\":true,\"value\":"), out.data), "}");
    } else {
      tf_put(&result, "{\"op\":\"result\",\"ok\":false,\"error\":{\"name\":\"");
      tf_put(&result, ok == -1 ? "NonRetryableError" : "Error");
      tf_put(tf_put(tf_put(&result, "\",\"message\":\""), out.data), "\"");
      tf_put(&result, ok == -1 ? ",\"retryable\":false}}" : "}}");
    }
    reply = tf_call(result.data);
  }
  return reply;
}

/* Report the workflow's result (a JSON value). */
static void tf_finish(const char *value) {
  tf_buf request = {{0}, 0};
  tf_call(tf_put(tf_put(tf_put(&request, "{\"op\":\"finish\",\"ok\":true,\"value\":"), value), "}")->data);
}

/* End the run after a step that did not return: a "raise" fails the workflow with the step's
 * error, "suspend"/"exit" just return (the kernel takes it from there). */
static void tf_stop(const char *reply, const char *step) {
  if (!tf_is(reply, "raise")) return;
  const char *message = tf_find(reply, "message");
  tf_buf request = {{0}, 0};
  tf_put(&request, "{\"op\":\"finish\",\"ok\":false,\"error\":{\"name\":\"StepError\",\"message\":");
  if (message) tf_putn(&request, message, tf_value_len(message));
  else tf_put(tf_put(tf_put(&request, "\"step "), step), " failed\"");
  tf_call(tf_put(&request, "}}")->data);
}

#endif
