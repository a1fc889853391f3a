/*
 * batch.c: what dynamic batching does to the requests of one batch, outside any lock: which
 * requests may share a backend call, their inputs concatenated along the batch dimension,
 * the backend's outputs split back by rows, and the per-size execution statistics.
 *
 * DESIGN
 * A batch is a list of requests (linked by qnext) that sched.c took from one vslot's queues
 * under rt->mu and leased one context for; from then on only the worker running it touches
 * them, so nothing here locks. Requests are never split: request i owns rows
 * [off_i, off_i + rows_i) of every input and every output. Two requests may share a batch
 * when their inputs have the same names in the same order, the same datatypes, and the same
 * dimensions besides the first (keel__batch_compatible; the config check of each request
 * still runs, keel__request_bind_inputs, before its rows are merged). Merged inputs are one
 * malloc'd buffer per input, freed when the run ends (keel__batch_inputs_free). An output
 * whose first dimension is not the batch's row count cannot be split: the backend call fails
 * for the whole batch with a message saying so. Outputs go to each request's run slot (never
 * to the request itself: it may have been answered meanwhile, sched.c). BYTES tensors are split
 * element by element (each element is a little-endian u32 length and its bytes). Layer: calls
 * request.c only.
 */
#include <string.h>

#include "runtime/batch.h"
#include "runtime/request.h"

bool keel__batch_compatible(const keel_request *a, const keel_request *b)
{
    if (a->ninputs != b->ninputs)
        return false;
    for (size_t i = 0; i < a->ninputs; i++) {
        const keel__tensor *x = &a->inputs[i], *y = &b->inputs[i];
        if (x->datatype != y->datatype || x->ndim != y->ndim || x->ndim == 0 ||
            strcmp(x->name, y->name) != 0)
            return false;
        if (x->ndim > 1 && memcmp(x->shape + 1, y->shape + 1, sizeof(int64_t) * (x->ndim - 1)) != 0)
            return false;
    }
    return true;
}

void keel__batch_inputs_free(void **bufs, size_t n)
{
    for (size_t j = 0; j < n; j++)
        free(bufs[j]);
}

keel_err keel__batch_inputs_merge(const keel__model_config *cfg, keel_request *list, int64_t rows,
                                  int64_t (*shapes)[KEEL__MAX_DIMS + 1], keel_tensor_view *views,
                                  void **bufs, char *errbuf, size_t errlen)
{
    for (size_t j = 0; j < cfg->ninputs; j++)
        bufs[j] = NULL;
    for (size_t j = 0; j < cfg->ninputs; j++) {
        size_t bytes = 0, off = 0;
        const keel_tensor_view *first = &list->views[j];
        char *buf;

        for (keel_request *r = list; r != NULL; r = r->qnext)
            bytes += r->views[j].bytes;
        if ((buf = keel__malloc(bytes > 0 ? bytes : 1)) == NULL) {
            keel__errf(errbuf, errlen, "out of memory merging input '%s' of a batch (%zu bytes)",
                       first->name, bytes);
            keel__batch_inputs_free(bufs, j);
            return KEEL_ENOMEM;
        }
        for (keel_request *r = list; r != NULL; r = r->qnext) {
            if (r->views[j].bytes > 0)
                memcpy(buf + off, r->views[j].data, r->views[j].bytes);
            off += r->views[j].bytes;
        }
        bufs[j] = buf;
        memcpy(shapes[j], first->shape, sizeof(int64_t) * first->ndim);
        shapes[j][0] = rows;
        views[j] = *first;
        views[j].shape = shapes[j];
        views[j].data = buf;
        views[j].bytes = bytes;
    }
    return KEEL_OK;
}

keel_err keel__batch_emit(keel__run_io *io, const char *name, keel_datatype dt,
                          const int64_t *shape, size_t ndim, const void *data, size_t bytes)
{
    keel__batch_sink *b = io->sink;
    int64_t sub[KEEL__MAX_DIMS + 1];
    size_t per_row_elems = 1, off = 0, esize = keel_datatype_size(dt);

    if (ndim == 0 || ndim > KEEL__MAX_DIMS + 1 || shape[0] != b->rows) {
        keel__errf(io->errbuf, io->errlen,
                   "output '%s' has %s%lld rows where the batch of %zu requests has %lld: keel "
                   "cannot split it back to the requests",
                   name, ndim == 0 ? "no dimension, so " : "",
                   ndim == 0 ? 0LL : (long long)shape[0], b->nreqs, (long long)b->rows);
        return KEEL_EBACKEND;
    }
    for (size_t d = 1; d < ndim; d++)
        per_row_elems *= (size_t)shape[d];
    memcpy(sub, shape, sizeof(int64_t) * ndim);
    for (size_t i = 0; i < b->nreqs; i++) {
        keel__run_slot *r = &b->slots[i];
        size_t len;
        keel_err err;
        sub[0] = r->rows;
        if (dt == KEEL_TYPE_BYTES) {
            size_t end;
            if (!keel__bytes_skip(data, bytes, off, per_row_elems * (size_t)r->rows, &end)) {
                keel__errf(io->errbuf, io->errlen, "output '%s': malformed BYTES data", name);
                return KEEL_EBACKEND;
            }
            len = end - off;
        } else {
            len = per_row_elems * (size_t)r->rows * esize;
            if (len > bytes - off) {
                keel__errf(io->errbuf, io->errlen,
                           "output '%s': %zu bytes do not hold the %lld rows its shape says", name,
                           bytes, (long long)b->rows);
                return KEEL_EBACKEND;
            }
        }
        if ((err = keel__request_emit_to(r, name, dt, sub, ndim, (const char *)data + off, len,
                                         io->errbuf, io->errlen)) != KEEL_OK)
            return err;
        off += len;
    }
    return KEEL_OK;
}

void keel__batch_stats_record(keel__stats *s, int64_t size, uint64_t input_ns, uint64_t infer_ns,
                              uint64_t output_ns)
{
    size_t h = (size_t)size * 2654435761u % KEEL__BATCH_SLOTS;

    for (size_t i = 0; i < KEEL__BATCH_SLOTS; i++) {
        keel__batch_slot *slot = &s->batch_slots[(h + i) % KEEL__BATCH_SLOTS];
        int64_t cur = atomic_load_explicit(&slot->size, memory_order_acquire);
        if (cur == 0) {
            int64_t zero = 0;
            if (atomic_compare_exchange_strong(&slot->size, &zero, size))
                cur = size;
            else
                cur = zero; /* another thread claimed it: with our size or another */
        }
        if (cur != size)
            continue;
        atomic_fetch_add_explicit(&slot->count, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&slot->input_ns, input_ns, memory_order_relaxed);
        atomic_fetch_add_explicit(&slot->infer_ns, infer_ns, memory_order_relaxed);
        atomic_fetch_add_explicit(&slot->output_ns, output_ns, memory_order_relaxed);
        return;
    }
    atomic_fetch_add_explicit(&s->batch_overflow, 1, memory_order_relaxed);
}
