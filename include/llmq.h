/* llmq.h: placeholder, being written */
#ifndef LLMQ_H
#define LLMQ_H
typedef enum llmq_status {
  LLMQ_OK = 0,
  LLMQ_ERR_INVALID_ARGUMENT = 1, /* a NULL pointer, a value out of range, contradictory parameters */
  LLMQ_ERR_IO = 2,               /* a file could not be opened, read, mapped or written */
  LLMQ_ERR_MODEL_FORMAT = 3,     /* a model file is malformed or does not match its config */
  LLMQ_ERR_UNSUPPORTED = 4,      /* valid input that this build does not handle (architecture, dtype) */
  LLMQ_ERR_OUT_OF_MEMORY = 5,    /* an allocation failed */
  LLMQ_ERR_KV_CACHE_FULL = 6,    /* the paged KV cache has no free block for the request */
  LLMQ_ERR_BACKEND_UNAVAILABLE = 7, /* the requested backend is not built in or has no device */
  LLMQ_ERR_BUFFER_TOO_SMALL = 8, /* an output buffer is too small; the needed size is reported */
  LLMQ_ERR_CONTEXT_OVERFLOW = 9, /* the sequence would exceed the model's context length */
  LLMQ_ERR_INTERNAL = 10         /* a bug in llmq: please report it */
} llmq_status;
#endif
