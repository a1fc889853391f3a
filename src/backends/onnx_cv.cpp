/*
 * onnx_cv.cpp: see onnx_cv.h. cv::dnn::Net behind a C interface.
 *
 * DESIGN
 * Every entry point is noexcept in effect: its body runs inside try { } catch (...) { } and a
 * caught exception becomes KEEL_ELOAD (load) or KEEL_EBACKEND (run) with OpenCV's message.
 * std::bad_alloc becomes KEEL_ENOMEM. No exception ever crosses into C.
 *
 * Process-wide OpenCV settings, applied once (std::call_once) before the first load:
 *  - Logging off (LOG_LEVEL_SILENT): libkeel never prints, and OpenCV's importer logs
 *    warnings to stderr. keel has no logger to route them to at this layer (backends get
 *    none), and every failure reaches the caller through the exception's message anyway.
 *  - cv::setNumThreads(1): keel gets its parallelism from several execution contexts running
 *    at once, one per worker thread; OpenCV's own thread pool would oversubscribe the cores
 *    (two contexts x N OpenCV threads) and its threads are invisible to ThreadSanitizer,
 *    whose reports about them would be false. These settings are global to the process: an
 *    embedding program that uses OpenCV itself sees them too (documented in ARCHITECTURE.md).
 * load_mu serialises readNetFromONNX across all threads (OpenCV's importers have reported
 * races); run takes no lock: a net belongs to one context and keel runs a context on one
 * thread at a time.
 */
#include "backends/onnx_cv.h"

#include <atomic>
#include <climits>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include <opencv2/core.hpp>
#include <opencv2/core/utils/logger.hpp>
#include <opencv2/dnn.hpp>

struct keel__cvnet {
    cv::dnn::Net net;
    std::vector<cv::String> out_names;
    std::vector<cv::Mat> outs;
    std::vector<int> sizes; /* scratch for input shapes */
};

namespace
{

std::mutex load_mu;
std::once_flag settings_once;
std::atomic<long> live_nets{0};

void apply_settings()
{
    cv::utils::logging::setLogLevel(cv::utils::logging::LOG_LEVEL_SILENT);
    cv::setNumThreads(1);
}

/*
 * OpenCV's messages look like "OpenCV(4.6.0) /path/file.cpp:123: error: (-2:Unspecified
 * error) in function 'f'\n> Node [Gemm]: parse error: OpenCV(4.6.0) ...: error: (-5:Bad
 * argument) Blob 1 not found ...". Keeps the reasons, drops the source locations and codes,
 * and puts it on one line (the model check's reply is one line).
 */
void clean_message(const char *m, std::string &out)
{
    out.clear();
    while (*m != '\0' && out.size() < 600) {
        if (std::strncmp(m, "OpenCV(", 7) == 0) {
            const char *e = std::strstr(m, " error: (");
            const char *close = e != nullptr ? std::strstr(e, ") ") : nullptr;
            if (close != nullptr) {
                m = close + 2;
                continue;
            }
        }
        if (*m == '\n' || *m == '\r' || *m == '\t') {
            if (!out.empty() && out.back() != ' ')
                out.push_back(' ');
            m++;
            while (*m == '>' || *m == ' ')
                m++;
            continue;
        }
        out.push_back(static_cast<unsigned char>(*m) < 0x20 ? '?' : *m);
        m++;
    }
    while (!out.empty() && out.back() == ' ')
        out.pop_back();
}

void put_error(char *errbuf, size_t errlen, const char *what, const char *prefix, const char *msg)
{
    if (errbuf == nullptr || errlen == 0)
        return;
    try {
        std::string clean;
        clean_message(msg != nullptr ? msg : "unknown error", clean);
        std::snprintf(errbuf, errlen, "%s: %s: %s", what, prefix, clean.c_str());
    } catch (...) {
        std::snprintf(errbuf, errlen, "%s: %s", what, prefix);
    }
}

} // namespace

extern "C" keel_err keel__cvnet_load(const void *bytes, size_t len, const char *what,
                                     keel__cvnet **out, char *errbuf, size_t errlen)
{
    *out = nullptr;
    try {
        std::call_once(settings_once, apply_settings);
        keel__cvnet *n = new keel__cvnet();
        try {
            std::lock_guard<std::mutex> lock(load_mu);
            n->net = cv::dnn::readNetFromONNX(static_cast<const char *>(bytes), len);
            if (n->net.empty()) {
                put_error(errbuf, errlen, what, "OpenCV cannot load the model",
                          "the network is empty");
                delete n;
                return KEEL_ELOAD;
            }
            n->net.setPreferableBackend(cv::dnn::DNN_BACKEND_OPENCV);
            n->net.setPreferableTarget(cv::dnn::DNN_TARGET_CPU);
        } catch (...) {
            delete n;
            throw;
        }
        live_nets.fetch_add(1, std::memory_order_relaxed);
        *out = n;
        return KEEL_OK;
    } catch (const std::bad_alloc &) {
        put_error(errbuf, errlen, what, "OpenCV cannot load the model", "out of memory");
        return KEEL_ENOMEM;
    } catch (const std::exception &ex) {
        put_error(errbuf, errlen, what, "OpenCV cannot load the model", ex.what());
        return KEEL_ELOAD;
    } catch (...) {
        put_error(errbuf, errlen, what, "OpenCV cannot load the model", "unknown exception");
        return KEEL_ELOAD;
    }
}

extern "C" keel_err keel__cvnet_run(keel__cvnet *n, const keel__cvnet_input *inputs, size_t ninputs,
                                    const char *const *outputs, size_t noutputs, char *errbuf,
                                    size_t errlen)
{
    try {
        for (size_t i = 0; i < ninputs; i++) {
            const keel__cvnet_input *in = &inputs[i];
            n->sizes.assign(in->ndim > 0 ? in->ndim : 1, 1);
            for (size_t d = 0; d < in->ndim; d++) {
                if (in->shape[d] < 0 || in->shape[d] > INT_MAX) {
                    put_error(errbuf, errlen, "onnx", "input shape", "dimension out of range");
                    return KEEL_EBACKEND;
                }
                n->sizes[d] = static_cast<int>(in->shape[d]);
            }
            /* A header over the caller's buffer; setInput copies it into the net. */
            cv::Mat blob(static_cast<int>(n->sizes.size()), n->sizes.data(), CV_32F,
                         const_cast<float *>(in->data));
            n->net.setInput(blob, in->name);
        }
        n->out_names.assign(outputs, outputs + noutputs);
        n->outs.clear();
        n->net.forward(n->outs, n->out_names);
        if (n->outs.size() != noutputs) {
            put_error(errbuf, errlen, "onnx", "forward", "OpenCV returned a wrong output count");
            return KEEL_EBACKEND;
        }
        return KEEL_OK;
    } catch (const std::bad_alloc &) {
        return KEEL_ENOMEM;
    } catch (const std::exception &ex) {
        put_error(errbuf, errlen, "onnx", "OpenCV forward failed", ex.what());
        return KEEL_EBACKEND;
    } catch (...) {
        put_error(errbuf, errlen, "onnx", "OpenCV forward failed", "unknown exception");
        return KEEL_EBACKEND;
    }
}

extern "C" keel_err keel__cvnet_output(keel__cvnet *n, size_t i, int64_t *shape, size_t max_dims,
                                       size_t *ndim, const float **data, size_t *count,
                                       char *errbuf, size_t errlen)
{
    try {
        cv::Mat &m = n->outs.at(i);
        if (m.type() != CV_32F || !m.isContinuous()) {
            put_error(errbuf, errlen, "onnx", n->out_names.at(i).c_str(),
                      "OpenCV produced a non-FP32 or non-contiguous output");
            return KEEL_EBACKEND;
        }
        if (static_cast<size_t>(m.dims) > max_dims) {
            put_error(errbuf, errlen, "onnx", n->out_names.at(i).c_str(),
                      "the output has too many dimensions");
            return KEEL_EBACKEND;
        }
        *ndim = static_cast<size_t>(m.dims);
        for (int d = 0; d < m.dims; d++)
            shape[d] = m.size[d];
        *data = m.ptr<float>();
        *count = m.total();
        return KEEL_OK;
    } catch (const std::exception &ex) {
        put_error(errbuf, errlen, "onnx", "reading an output", ex.what());
        return KEEL_EBACKEND;
    } catch (...) {
        put_error(errbuf, errlen, "onnx", "reading an output", "unknown exception");
        return KEEL_EBACKEND;
    }
}

extern "C" long keel__cvnet_live(void)
{
    return live_nets.load(std::memory_order_relaxed);
}

extern "C" void keel__cvnet_free(keel__cvnet *n)
{
    if (n == nullptr)
        return;
    live_nets.fetch_sub(1, std::memory_order_relaxed);
    try {
        delete n;
    } catch (...) {
        /* A destructor that throws would terminate; nothing to report here. */
    }
}
