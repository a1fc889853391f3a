/*
 * absl_mode.cpp: switches gRPC's mutexes (Abseil's absl::Mutex) to the mode of Abseil's
 * release builds, for the two programs that use gRPC (keel serve, keel perf).
 *
 * DESIGN
 * Debian builds Abseil without NDEBUG, so absl::Mutex keeps its debug default: every lock
 * and unlock records the lock in a global lock-order graph (deadlock detection,
 * GraphCycles::GetId and a global mutex of its own). gRPC's core takes several mutexes per
 * call, so that bookkeeping costs each gRPC call of keel serve and keel perf a few thousand
 * instructions (bench/callgrind_grpc.sh; docs/PERFORMANCE.md). Abseil's switch for it is a
 * C++ function only, hence this one C++ file; OnDeadlockCycle::kIgnore is what an NDEBUG
 * build of Abseil starts with. No state of ours, no lock; called from the main thread before
 * grpc_init (the setting is an atomic in Abseil, read on every lock).
 */
#include <absl/synchronization/mutex.h>

#include "cliutil.h"

void keel__cli_absl_release_mode(void)
{
    absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
}
