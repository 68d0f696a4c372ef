// cuda_emu's test driver: runs the kernels' C launchers on cases read from a file.
//
//   driver CASES OUT META
//
// CASES holds records of a CaseHeader followed by the input arrays (see harness.py);
// for each one the driver makes every buffer its own exact-size heap block (so an
// access past its end is an AddressSanitizer error), places it at the requested byte
// offset (misaligned pointers), fills the output and the L2 workspace with NaN bytes
// (so a missed write shows), runs the launcher and appends the output's bytes to OUT
// and one JSON line (error code, workspace size, launches, the L2 schedule) to META.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda_emu_api.h"
#include "fastadv_kernels.cuh"

namespace {

struct CaseHeader {
  int64_t op;  // 0 linf_step, 1 linf_project, 2 l2_step, 3 l2_project
  int64_t x_dtype, grad_dtype;
  int64_t numel, per_sample;
  int64_t sms, l2_bytes;
  int64_t off_out, off_x, off_xn, off_g;  // byte offset of each buffer in its heap block
  int64_t out_is_x;                       // out aliases x (the in-place forms)
  int64_t has_alpha_t, has_eps_t;
  int64_t plan_only;                      // no arrays follow: report the L2 schedule only
  double alpha, eps, lower, upper;
};

void write_schedule(std::FILE* meta, const CaseHeader& h) {
  const fastadv_l2_schedule s = fastadv_l2_schedule_for(
      h.numel, h.per_sample, static_cast<fastadv_dtype>(h.x_dtype), static_cast<fastadv_dtype>(h.grad_dtype),
      h.op == 2);
  std::fprintf(meta, "\"schedule\": [%d, %lld, %lld, %lld], ", s.blocks_per_sample,
               static_cast<long long>(s.samples_per_group), static_cast<long long>(s.blocks),
               static_cast<long long>(s.workspace_bytes));
}

size_t elem_size(int64_t d) { return d == FASTADV_FLOAT32 ? 4 : 2; }

struct Block {  // one heap block; `p` is the buffer inside it
  unsigned char* base = nullptr;
  unsigned char* p = nullptr;
  Block() = default;
  Block(size_t off, size_t bytes) {
    base = static_cast<unsigned char*>(std::malloc(off + bytes > 0 ? off + bytes : 1));
    if (base == nullptr) {
      std::perror("malloc");
      std::exit(2);
    }
    p = base + off;
  }
  void release() {
    std::free(base);
    base = p = nullptr;
  }
};

bool read_exact(std::FILE* f, void* dst, size_t n) { return std::fread(dst, 1, n, f) == n; }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s CASES OUT META\n", argv[0]);
    return 2;
  }
  std::FILE* in = std::fopen(argv[1], "rb");
  std::FILE* out = std::fopen(argv[2], "wb");
  std::FILE* meta = std::fopen(argv[3], "w");
  if (!in || !out || !meta) {
    std::perror("open");
    return 2;
  }
  CaseHeader h;
  while (read_exact(in, &h, sizeof h)) {
    if (h.plan_only) {
      cuda_emu_use_device(static_cast<int>(h.sms), static_cast<int>(h.l2_bytes));
      std::fprintf(meta, "{");
      write_schedule(meta, h);
      std::fprintf(meta, "\"err\": 0, \"workspace_bytes\": 0, \"launches\": []}\n");
      continue;
    }
    const size_t xs = elem_size(h.x_dtype), gs = elem_size(h.grad_dtype);
    const bool step = h.op == 0 || h.op == 2;
    const int64_t batch = h.per_sample > 0 ? h.numel / h.per_sample : 0;
    Block x(h.off_x, h.numel * xs), xn(h.off_xn, h.numel * xs), g, out_b, at, et;
    bool ok = read_exact(in, x.p, h.numel * xs) && read_exact(in, xn.p, h.numel * xs);
    if (step) {
      g = Block(h.off_g, h.numel * gs);
      ok = ok && read_exact(in, g.p, h.numel * gs);
    }
    if (h.has_alpha_t) {
      at = Block(0, batch * sizeof(float));
      ok = ok && read_exact(in, at.p, batch * sizeof(float));
    }
    if (h.has_eps_t) {
      et = Block(0, batch * sizeof(float));
      ok = ok && read_exact(in, et.p, batch * sizeof(float));
    }
    if (!ok) {
      std::fprintf(stderr, "driver: truncated case file\n");
      return 2;
    }
    unsigned char* o = x.p;
    if (!h.out_is_x) {
      out_b = Block(h.off_out, h.numel * xs);
      std::memset(out_b.p, 0xff, h.numel * xs);  // NaN in every dtype
      o = out_b.p;
    }
    cuda_emu_use_device(static_cast<int>(h.sms), static_cast<int>(h.l2_bytes));
    cuda_emu_clear_log();
    size_t ws_bytes = 0;
    Block ws;
    if (h.op >= 2) {
      ws_bytes = fastadv_l2_workspace_bytes(h.numel, h.per_sample);
      if (ws_bytes > 0) {
        ws = Block(0, ws_bytes);
        std::memset(ws.p, 0xff, ws_bytes);
      }
    }
    float* wsp = reinterpret_cast<float*>(ws.p);
    cudaError_t err;
    if (step) {
      fastadv_step_params p;
      p.out = o;
      p.x_adv = x.p;
      p.x_nat = xn.p;
      p.grad = g.p;
      p.x_dtype = static_cast<fastadv_dtype>(h.x_dtype);
      p.grad_dtype = static_cast<fastadv_dtype>(h.grad_dtype);
      p.numel = h.numel;
      p.per_sample = h.per_sample;
      p.alpha_t = reinterpret_cast<const float*>(at.p);
      p.alpha = static_cast<float>(h.alpha);
      p.eps_t = reinterpret_cast<const float*>(et.p);
      p.eps = static_cast<float>(h.eps);
      p.lower = static_cast<float>(h.lower);
      p.upper = static_cast<float>(h.upper);
      err = h.op == 0 ? fastadv_linf_step_launch(&p, nullptr) : fastadv_l2_step_launch(&p, wsp, nullptr);
    } else {
      fastadv_project_params p;
      p.out = o;
      p.x = x.p;
      p.x_nat = xn.p;
      p.x_dtype = static_cast<fastadv_dtype>(h.x_dtype);
      p.numel = h.numel;
      p.per_sample = h.per_sample;
      p.eps_t = reinterpret_cast<const float*>(et.p);
      p.eps = static_cast<float>(h.eps);
      p.lower = static_cast<float>(h.lower);
      p.upper = static_cast<float>(h.upper);
      err = h.op == 1 ? fastadv_linf_project_launch(&p, nullptr) : fastadv_l2_project_launch(&p, wsp, nullptr);
    }
    std::fwrite(o, 1, h.numel * xs, out);
    std::fprintf(meta, "{");
    if (h.op >= 2) write_schedule(meta, h);
    std::fprintf(meta, "\"err\": %d, \"workspace_bytes\": %zu, \"launches\": [", static_cast<int>(err), ws_bytes);
    for (int i = 0; i < cuda_emu_launch_count(); ++i) {
      const cuda_emu_launch_record* r = cuda_emu_launch(i);
      std::fprintf(meta, "%s[\"%s\", [%u, %u, %u], [%u, %u, %u]]", i ? ", " : "", r->name, r->grid[0],
                   r->grid[1], r->grid[2], r->block[0], r->block[1], r->block[2]);
    }
    std::fprintf(meta, "]}\n");
    for (Block* b : {&x, &xn, &g, &out_b, &at, &et, &ws}) b->release();
  }
  std::fclose(in);
  std::fclose(out);
  std::fclose(meta);
  return 0;
}
