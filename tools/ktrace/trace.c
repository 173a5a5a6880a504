// CUDA injection library (CUDA_INJECTION64_PATH): records every kernel's GPU time with CUPTI's
// activity API; at exit writes per-kernel-name totals to $KTRACE_OUT, counting only kernels that
// started between the program's cuProfilerStart and cuProfilerStop (all if it never calls them).
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// The kernel record of the CUPTI headers built against (CUDA 13.0's CUPTI: -DKREC=CUpti_ActivityKernel10).
#ifndef KREC
#define KREC CUpti_ActivityKernel11
#endif
#define MAXK 8192
static char names[MAXK][200];
static int nk = 0;
typedef struct { int k; unsigned long long s, e; } Rec;
static Rec* recs = NULL;
static size_t nrec = 0, caprec = 0;
static unsigned long long t_on = 0, t_off = ~0ULL;

static int intern(const char* name) {
    char s[200];
    snprintf(s, sizeof s, "%s", name ? name : "?");
    for (int i = nk - 1; i >= 0; i--) if (!strcmp(names[i], s)) return i;
    if (nk < MAXK) { strcpy(names[nk], s); return nk++; }
    return MAXK - 1;
}

static void push(const char* name, unsigned long long s, unsigned long long e) {
    if (nrec == caprec) { caprec = caprec ? 2 * caprec : 1 << 16; recs = realloc(recs, caprec * sizeof(Rec)); }
    recs[nrec].k = intern(name); recs[nrec].s = s; recs[nrec].e = e; nrec++;
}

static void CUPTIAPI request(uint8_t** buf, size_t* size, size_t* max) {
    *size = 8 << 20; *buf = (uint8_t*)aligned_alloc(8, *size); *max = 0;
}

static void CUPTIAPI complete(CUcontext c, uint32_t sid, uint8_t* buf, size_t size, size_t valid) {
    CUpti_Activity* r = NULL;
    while (cuptiActivityGetNextRecord(buf, valid, &r) == CUPTI_SUCCESS) {
        if (r->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || r->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
            KREC* k = (KREC*)r;
            char nm[200];
            if (getenv("KTRACE_GRID"))
                snprintf(nm, sizeof nm, "%.150s <%d,%d,%d>x%d", k->name ? k->name : "?", k->gridX, k->gridY, k->gridZ, k->blockX);
            else
                snprintf(nm, sizeof nm, "%s", k->name ? k->name : "?");
            push(nm, k->start, k->end);
        } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
            CUpti_ActivityMemcpy6* m = (CUpti_ActivityMemcpy6*)r;
            push(m->copyKind == 1 ? "[memcpy HtoD]" : m->copyKind == 2 ? "[memcpy DtoH]" : "[memcpy other]", m->start, m->end);
        } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
            CUpti_ActivityMemset4* m = (CUpti_ActivityMemset4*)r;
            push("[memset]", m->start, m->end);
        }
    }
    free(buf);
}

static void CUPTIAPI on_api(void* u, CUpti_CallbackDomain d, CUpti_CallbackId id, const void* data) {
    const CUpti_CallbackData* cb = (const CUpti_CallbackData*)data;
    uint64_t t; cuptiGetTimestamp(&t);
    if (id == CUPTI_DRIVER_TRACE_CBID_cuProfilerStart && cb->callbackSite == CUPTI_API_EXIT) t_on = t;
    if (id == CUPTI_DRIVER_TRACE_CBID_cuProfilerStop && cb->callbackSite == CUPTI_API_ENTER) t_off = t;
}

static void finish(void) {
    cuptiActivityFlushAll(1);
    const char* p = getenv("KTRACE_OUT");
    FILE* f = fopen(p ? p : "ktrace.txt", "w");
    if (!f) return;
    double* ns = calloc(MAXK, sizeof(double));
    unsigned long long* n = calloc(MAXK, sizeof(unsigned long long));
    double tot = 0; unsigned long long cnt = 0, first = ~0ULL, last = 0;
    for (size_t i = 0; i < nrec; i++) {
        if (recs[i].s < t_on || recs[i].s > t_off) continue;
        ns[recs[i].k] += (double)(recs[i].e - recs[i].s); n[recs[i].k]++;
        tot += (double)(recs[i].e - recs[i].s); cnt++;
        if (recs[i].s < first) first = recs[i].s;
        if (recs[i].e > last) last = recs[i].e;
    }
    fprintf(f, "window %s: %.3f ms of GPU time in %llu kernels/copies, first start to last end %.3f ms\n",
            t_on ? "cuProfilerStart..Stop" : "whole run", tot / 1e6, cnt, cnt ? (last - first) / 1e6 : 0.0);
    for (;;) {
        int b = -1;
        for (int i = 0; i < nk; i++) if (n[i] && (b < 0 || ns[i] > ns[b])) b = i;
        if (b < 0) break;
        fprintf(f, "%10.3f ms %5.1f%% %8llu x %9.2f us  %s\n", ns[b] / 1e6, 100.0 * ns[b] / tot, n[b], ns[b] / 1e3 / n[b], names[b]);
        n[b] = 0;
    }
    fclose(f);
}

int InitializeInjection(void) {
    CUpti_SubscriberHandle h;
    cuptiSubscribe(&h, (CUpti_CallbackFunc)on_api, NULL);
    cuptiEnableCallback(1, h, CUPTI_CB_DOMAIN_DRIVER_API, CUPTI_DRIVER_TRACE_CBID_cuProfilerStart);
    cuptiEnableCallback(1, h, CUPTI_CB_DOMAIN_DRIVER_API, CUPTI_DRIVER_TRACE_CBID_cuProfilerStop);
    cuptiActivityRegisterCallbacks(request, complete);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
    atexit(finish);
    return 1;
}
