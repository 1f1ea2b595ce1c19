/* (quota55) A stand-in for libnvidia-ml.so.1 with the five calls server/nvml.py makes, for a host without an NVIDIA
   driver (this project's CI): the test adds devices (UUID, PCI address, memory, an error) and reads what was asked.
   Error codes and nvmlMemory_t's layout as NVML's nvml.h. */
#include <string.h>
#include <strings.h>

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
struct dev { char uuid[96]; char pci[32]; unsigned long long total, free; int mem_rc; };
static struct dev devs[8];
static int ndev, init_rc, counts[5]; /* inits, shutdowns, by-UUID asks, by-PCI asks, memory asks */

void stub_reset(int rc) { ndev = 0; init_rc = rc; memset(counts, 0, sizeof counts); }
int stub_count(int which) { return counts[which]; }
void stub_add(const char *uuid, const char *pci, unsigned long long total, unsigned long long free_, int mem_rc) {
    struct dev *d = &devs[ndev++ % 8];
    strncpy(d->uuid, uuid, sizeof d->uuid - 1);
    strncpy(d->pci, pci, sizeof d->pci - 1);
    d->total = total; d->free = free_; d->mem_rc = mem_rc;
}

int nvmlInit_v2(void) { counts[0]++; return init_rc; }
int nvmlShutdown(void) { counts[1]++; return 0; }
const char *nvmlErrorString(int rc) {
    switch (rc) {
    case 0: return "Success";
    case 6: return "Not Found";
    case 9: return "Driver Not Loaded";
    case 15: return "GPU is lost";
    default: return "Unknown Error";
    }
}
int nvmlDeviceGetHandleByUUID(const char *uuid, void **handle) {
    counts[2]++;
    for (int i = 0; i < ndev; i++)
        if (strcmp(devs[i].uuid, uuid) == 0) { *handle = &devs[i]; return 0; }
    return 6;
}
int nvmlDeviceGetHandleByPciBusId_v2(const char *pci, void **handle) {
    counts[3]++;
    for (int i = 0; i < ndev; i++)
        if (strcasecmp(devs[i].pci, pci) == 0) { *handle = &devs[i]; return 0; }
    return 6;
}
int nvmlDeviceGetMemoryInfo(void *handle, nvmlMemory_t *memory) {
    struct dev *d = handle;
    counts[4]++;
    if (d->mem_rc) return d->mem_rc;
    memory->total = d->total; memory->free = d->free; memory->used = d->total - d->free;
    return 0;
}
