// ctest: load the fastadv_ext library, call its ops through the dispatcher and
// compare with ATen formulas; bad arguments must raise errors naming them.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>

#include <cstdio>
#include <optional>
#include <string>

namespace {

int failures = 0, passes = 0;

void expect(bool ok, const std::string& what) {
  if (ok) {
    ++passes;
  } else {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

using StepFn = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&,
                    double, double, double);
using ProjectFn = void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const std::optional<at::Tensor>&, double, double, double);

c10::TypedOperatorHandle<StepFn> step_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<StepFn>();
}

c10::TypedOperatorHandle<ProjectFn> project_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<ProjectFn>();
}

at::Tensor linf_step_expected(const at::Tensor& xa, const at::Tensor& xn, const at::Tensor& g,
                              double alpha, double eps) {
  const at::Tensor moved = xa + alpha * at::sign(g);
  return at::clamp(at::minimum(at::maximum(moved, xn - eps), xn + eps), 0.0, 1.0);
}

at::Tensor l2_project_expected(const at::Tensor& x, const at::Tensor& xn, double eps) {
  const at::Tensor d = x - xn;
  const at::Tensor n = d.flatten(1).norm(2, 1).view({-1, 1, 1, 1});
  const at::Tensor scale = at::where(n > eps, eps / n, at::ones_like(n));
  return at::clamp(xn + d * scale, 0.0, 1.0);
}

template <class F>
bool throws_naming(F&& f, const std::string& word) {
  try {
    f();
  } catch (const c10::Error& e) {
    return std::string(e.what()).find(word) != std::string::npos;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::printf("usage: %s path/to/libfastadv_ext.so\n", argv[0]);
    return 2;
  }
  if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::printf("cannot load %s: %s\n", argv[1], dlerror());
    return 2;
  }
  at::manual_seed(0);
  const auto linf_step = step_op("fastadv_ext::linf_step");
  const auto l2_project = project_op("fastadv_ext::l2_project");

  for (const auto& shape : {std::vector<int64_t>{1, 3, 5, 7}, std::vector<int64_t>{4, 3, 32, 32},
                            std::vector<int64_t>{3, 1, 17, 13}}) {
    const at::Tensor xn = at::rand(shape);
    const at::Tensor xa = (xn + 0.05 * at::randn(shape)).clamp(0, 1);
    at::Tensor g = at::randn(shape);
    g.view(-1).index_put_({at::indexing::Slice(0, 3)}, 0.0);
    at::Tensor out = at::empty_like(xa);
    linf_step.call(out, xa, xn, g, std::nullopt, 2.0 / 255, std::nullopt, 8.0 / 255, 0.0, 1.0);
    expect(at::allclose(out, linf_step_expected(xa, xn, g, 2.0 / 255, 8.0 / 255), 0.0, 1e-6),
           "linf_step matches the ATen formula");
    at::Tensor inplace = xa.clone();
    linf_step.call(inplace, inplace, xn, g, std::nullopt, 2.0 / 255, std::nullopt, 8.0 / 255, 0.0, 1.0);
    expect(at::equal(inplace, out), "linf_step in place equals out of place");
    at::Tensor out2 = at::empty_like(xa);
    l2_project.call(out2, xa, xn, std::nullopt, 0.3, 0.0, 1.0);
    expect(at::allclose(out2, l2_project_expected(xa, xn, 0.3), 0.0, 1e-6),
           "l2_project matches the ATen formula");
  }

  const at::Tensor x = at::rand({2, 3, 4, 4});
  at::Tensor out = at::empty_like(x);
  expect(throws_naming([&] {
           linf_step.call(out, x, at::rand({2, 3, 4, 5}), x, std::nullopt, 0.1, std::nullopt, 0.1, 0.0, 1.0);
         }, "x_nat"),
         "a mismatched x_nat shape is an error naming x_nat");
  expect(throws_naming([&] {
           linf_step.call(out, x, x, x, at::ones({3}), 0.0, std::nullopt, 0.1, 0.0, 1.0);
         }, "alpha_t"),
         "a wrong-sized alpha_t is an error naming alpha_t");
  expect(throws_naming([&] {
           linf_step.call(out, x, x.to(at::kHalf), x, std::nullopt, 0.1, std::nullopt, 0.1, 0.0, 1.0);
         }, "x_nat"),
         "a mismatched x_nat dtype is an error naming x_nat");
  expect(throws_naming([&] {
           linf_step.call(out, x, x, x, std::nullopt, 0.1, std::nullopt, 0.1, 1.0, 0.0);
         }, "lower"),
         "lower > upper is an error");

  std::printf("%d passed, %d failed\n", passes, failures);
  return failures == 0 ? 0 : 1;
}
