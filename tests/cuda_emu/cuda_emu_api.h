// cuda_emu's controls for the test driver: emulated devices and the launch log.
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cuda_emu_launch_record {
  char name[192];        // the kernel as written at the launch, e.g. "l2_fused_kernel<X, G, VEC, STEP>"
  unsigned grid[3];
  unsigned block[3];
} cuda_emu_launch_record;

// Makes a device with this many multiprocessors and this L2 size current (added on
// first use); returns its index. Device 0 has 4 SMs and 4 MiB of L2.
int cuda_emu_use_device(int sms, int l2_bytes);
void cuda_emu_clear_log(void);
int cuda_emu_launch_count(void);
const cuda_emu_launch_record* cuda_emu_launch(int i);

#ifdef __cplusplus
}
#endif
