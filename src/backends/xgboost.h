/*
 * xgboost.h: what the xgboost backend (xgboost.c) offers besides its backend table: the trial
 * load keel-model-check runs in its child process.
 *
 * DESIGN
 * keel__xgb_trial is called by tools/keel_model_check.c only, in a process of its own, on
 * bytes the server read and is about to load: no state, no locks.
 */
#ifndef KEEL_BACKENDS_XGBOOST_H
#define KEEL_BACKENDS_XGBOOST_H

#include <stddef.h>
#include <stdint.h>

#include "keel/keel.h"

/* The structural check, XGBoost's loader and two predictions of one row of nfeatures values
 * (0: the model's own count). KEEL_OK or an error with a message naming path. */
keel_err keel__xgb_trial(const char *path, const char *bytes, size_t n, int64_t nfeatures,
                         char *errbuf, size_t errlen);

#endif
