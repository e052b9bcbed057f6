// flash_mha's torch custom ops: schemas, input checks, params filling and device dispatch.
// This is the only file that sees at::Tensor; kernels receive FwdParams/BwdParams.
#include <ATen/ATen.h>
#include <Python.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <type_traits>

#include "flash_mha.h"
#include "philox.h"

#ifdef FLASH_MHA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

// An importable, empty `flash_mha._C`: importing it runs the TORCH_LIBRARY registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace flash_mha {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr int64_t kMaxHeadDim = 256;

Dtype to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return Dtype::kFloat64;
    case at::kFloat: return Dtype::kFloat32;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, std::string("flash_mha: q, k, v must be float64, float32, float16 or bfloat16, got ") +
                             c10::toString(t) + "; convert them with .to(torch.float16) or similar");
  }
}

at::ScalarType lse_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Error messages. Every check formats its message here into one std::string (numbers with
// std::to_string / snprintf) instead of streaming values through TORCH_CHECK's ostream: on the GPU
// machine's torch 2.11 build, a number streamed into a TORCH_CHECK message from this library
// crashed the process (segfault instead of the RuntimeError; messages of plain strings and dtype
// names were fine). FMHA_CHECK(cond, parts...) is TORCH_CHECK with the message built by msg().
std::string shape_str(at::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}

inline void msg_part(std::string& s, const char* x) { s += x; }
inline void msg_part(std::string& s, const std::string& x) { s += x; }
inline void msg_part(std::string& s, at::ScalarType t) { s += c10::toString(t); }
inline void msg_part(std::string& s, at::IntArrayRef a) { s += shape_str(a); }
inline void msg_part(std::string& s, double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  s += buf;
}
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void msg_part(std::string& s, T x) {
  s += std::to_string(x);
}

template <typename... Args>
std::string msg(const Args&... args) {
  std::string s;
  (msg_part(s, args), ...);
  return s;
}

#define FMHA_CHECK(cond, ...) TORCH_CHECK(cond, ::flash_mha::msg(__VA_ARGS__))

// A bias or mask is 4-d and each dim is 1 (broadcast) or the full size of [b, h, n_q, n_k].
Strided4 broadcast_strides(const Tensor& t, const char* name, at::IntArrayRef full) {
  FMHA_CHECK(t.dim() == 4, "flash_mha: ", name, " must be 4-d [b, h, n_q, n_k] at the op level, got ",
              t.dim(), " dims (the Python API broadcasts fewer dims for you)");
  int64_t s[4];
  for (int i = 0; i < 4; ++i) {
    FMHA_CHECK(t.size(i) == 1 || t.size(i) == full[i], "flash_mha: ", name, " of shape ", t.sizes(),
                " is not broadcastable to [b, h, n_q, n_k] = ", full, " (dim ", i, " must be 1 or ", full[i], ")");
    s[i] = t.size(i) == 1 ? 0 : t.stride(i);
  }
  return Strided4{s[0], s[1], s[2], s[3]};
}

// The batch, head and row strides of a [b, h, n, d] tensor. A size-1 dim's stride never enters an
// address, so it is replaced by the stride that dim would have if laid out right after the next one
// (a single row: d rounded up to 8): views with odd strides on size-1 dims (a sliced batch or head,
// one query) then still meet the tensor-core paths' 16-byte rules instead of going to SIMT.
std::array<int64_t, 3> bhn_strides(const Tensor& t) {
  const int64_t sn = t.size(2) == 1 ? (t.size(3) + 7) / 8 * 8 : t.stride(2);
  const int64_t sh = t.size(1) == 1 ? sn * std::max<int64_t>(t.size(2), 1) : t.stride(1);
  const int64_t sb = t.size(0) == 1 ? sh * std::max<int64_t>(t.size(1), 1) : t.stride(0);
  return {sb, sh, sn};
}

void check_last_dim(const Tensor& t, const char* name) {
  FMHA_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, "flash_mha: ", name,
              " must have a contiguous last dim (stride 1), got strides ", t.strides(),
              "; call .contiguous() on it");
}

void check_device(const Tensor& t, const Tensor& q, const char* name) {
  FMHA_CHECK(t.device() == q.device(), "flash_mha: ", name, " is on ", t.device().str(), " but q is on ",
              q.device().str(), "; move all inputs to one device");
}

// The CUDA kernel path forced by set_cuda_path (CudaPath; 0 = automatic).
std::atomic<int> g_cuda_path{0};

// Checks the inputs shared by fwd and bwd and fills the forward params.
FwdParams make_fwd_params(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& bias,
                          const OptTensor& mask, double scale, int64_t causal, double dropout_p,
                          const OptTensor& rng) {
  FMHA_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "flash_mha: q, k, v must be 4-d [batch, heads, seqlen, head_dim], got ", q.dim(), ", ", k.dim(),
              " and ", v.dim(), " dims");
  FwdParams p{};
  p.dtype = to_dtype(q.scalar_type());
  p.path = static_cast<CudaPath>(g_cuda_path.load(std::memory_order_relaxed));
  FMHA_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "flash_mha: q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  check_device(k, q, "k");
  check_device(v, q, "v");
  p.b = q.size(0), p.h = q.size(1), p.n_q = q.size(2), p.d = q.size(3);
  p.h_kv = k.size(1), p.n_k = k.size(2), p.d_v = v.size(3);
  FMHA_CHECK(k.size(0) == p.b && v.size(0) == p.b, "flash_mha: batch sizes differ: q ", p.b, ", k ",
              k.size(0), ", v ", v.size(0));
  FMHA_CHECK(v.size(1) == p.h_kv, "flash_mha: k and v must have the same number of heads, got ", p.h_kv,
              " and ", v.size(1));
  FMHA_CHECK(p.h_kv > 0 ? p.h % p.h_kv == 0 : p.h == 0,
              "flash_mha: query heads (", p.h, ") must be a multiple of key/value heads (", p.h_kv, ")");
  FMHA_CHECK(v.size(2) == p.n_k, "flash_mha: k and v must have the same sequence length, got ", p.n_k,
              " and ", v.size(2));
  FMHA_CHECK(k.size(3) == p.d, "flash_mha: q and k must have the same head dim, got ", p.d, " and ",
              k.size(3));
  FMHA_CHECK(p.d >= 1 && p.d <= kMaxHeadDim && p.d_v >= 1 && p.d_v <= kMaxHeadDim,
              "flash_mha: head dims must be in [1, 256], got d = ", p.d, ", d_v = ", p.d_v);
  check_last_dim(q, "q");
  check_last_dim(k, "k");
  check_last_dim(v, "v");
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  const auto q_s = bhn_strides(q);
  p.q_sb = q_s[0], p.q_sh = q_s[1], p.q_sn = q_s[2];
  const auto k_s = bhn_strides(k);
  p.k_sb = k_s[0], p.k_sh = k_s[1], p.k_sn = k_s[2];
  const auto v_s = bhn_strides(v);
  p.v_sb = v_s[0], p.v_sh = v_s[1], p.v_sn = v_s[2];

  const std::vector<int64_t> full{p.b, p.h, p.n_q, p.n_k};
  if (bias.has_value()) {
    FMHA_CHECK(bias->scalar_type() == q.scalar_type(), "flash_mha: bias must have q's dtype ",
                q.scalar_type(), ", got ", bias->scalar_type(), "; convert it with .to(q.dtype)");
    check_device(*bias, q, "bias");
    p.bias_s = broadcast_strides(*bias, "bias", full);
    p.bias = bias->data_ptr();
  }
  if (mask.has_value()) {
    FMHA_CHECK(mask->scalar_type() == at::kBool, "flash_mha: mask must be bool (True = attend), got ",
                mask->scalar_type(), "; pass a float tensor as bias instead");
    check_device(*mask, q, "mask");
    p.mask_s = broadcast_strides(*mask, "mask", full);
    p.mask = reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>());
  }
  FMHA_CHECK(causal >= 0 && causal <= 2, "flash_mha: causal must be 0 (none), 1 (top-left) or 2 (bottom-right), got ",
              causal);
  p.causal = static_cast<Causal>(causal);
  FMHA_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "flash_mha: dropout_p must be in [0, 1), got ", dropout_p);
  FMHA_CHECK(std::isfinite(scale), "flash_mha: scale must be finite, got ", scale);
  p.scale = scale;
  p.dropout_p = dropout_p;
  p.dropout_threshold = dropout_threshold(dropout_p);
  if (dropout_p > 0.0) {
    FMHA_CHECK(rng.has_value() && rng->scalar_type() == at::kLong && rng->numel() == 2 && rng->is_contiguous(),
                "flash_mha: dropout_p > 0 needs rng_state, a contiguous int64 tensor [seed, offset]");
    check_device(*rng, q, "rng_state");
    p.rng = rng->data_ptr<int64_t>();
  }
  return p;
}

#ifdef FLASH_MHA_WITH_CUDA
void check_cuda_arch(const Tensor& q) {
  const auto* prop = at::cuda::getDeviceProperties(q.device().index());
  FMHA_CHECK(prop->major >= 8, "flash_mha: CUDA kernels need compute capability 8.0 (Ampere) or newer; ",
              prop->name, " is ", prop->major, ".", prop->minor, ". Move the tensors to the CPU to use the CPU kernel");
}
#endif

std::tuple<Tensor, Tensor, Tensor> fwd(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& bias,
                                       const OptTensor& mask, double scale, int64_t causal, double dropout_p,
                                       const OptTensor& rng_state) {
  FwdParams p = make_fwd_params(q, k, v, bias, mask, scale, causal, dropout_p, rng_state);
  Tensor out = at::empty({p.b, p.h, p.n_q, p.d_v}, q.options());
  Tensor lse = at::empty({p.b, p.h, p.n_q}, q.options().dtype(lse_dtype(q.scalar_type())));
  Tensor rng_out = dropout_p > 0.0 ? rng_state->clone() : at::empty({0}, q.options().dtype(at::kLong));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse, rng_out};
  if (p.n_k == 0) {  // nothing to attend to: zeros, lse = +inf
    out.zero_();
    lse.fill_(std::numeric_limits<double>::infinity());
    return {out, lse, rng_out};
  }
  p.o = out.data_ptr(), p.lse = lse.data_ptr();
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_sn = out.stride(2);
  if (q.is_cuda()) {
#ifdef FLASH_MHA_WITH_CUDA
    check_cuda_arch(q);
    const c10::cuda::CUDAGuard guard(q.device());
    cuda_fwd(p, at::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
    FMHA_CHECK(false, "flash_mha was built without CUDA");
#endif
  } else {
    cpu_fwd(p);
  }
  return {out, lse, rng_out};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bwd(const Tensor& dout_in, const Tensor& q, const Tensor& k,
                                               const Tensor& v, const Tensor& out, const Tensor& lse,
                                               const OptTensor& bias, const OptTensor& mask, double scale,
                                               int64_t causal, double dropout_p, const OptTensor& rng_state,
                                               bool bias_requires_grad) {
  BwdParams p{};
  static_cast<FwdParams&>(p) = make_fwd_params(q, k, v, bias, mask, scale, causal, dropout_p, rng_state);
  FMHA_CHECK(!bias_requires_grad || bias.has_value(), "flash_mha: bias_requires_grad needs a bias");
  const std::vector<int64_t> o_shape{p.b, p.h, p.n_q, p.d_v};
  FMHA_CHECK(dout_in.sizes() == at::IntArrayRef(o_shape) && out.sizes() == at::IntArrayRef(o_shape),
              "flash_mha: dout and out must have shape ", at::IntArrayRef(o_shape), ", got ", dout_in.sizes(),
              " and ", out.sizes());
  FMHA_CHECK(dout_in.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "flash_mha: dout and out must have q's dtype ", q.scalar_type());
  FMHA_CHECK(lse.sizes() == at::IntArrayRef({p.b, p.h, p.n_q}) && lse.scalar_type() == lse_dtype(q.scalar_type()),
              "flash_mha: lse must be the forward's log-sum-exp, [b, h, n_q] ", lse_dtype(q.scalar_type()));
  check_device(dout_in, q, "dout");
  check_device(out, q, "out");
  check_device(lse, q, "lse");
  const Tensor dout = dout_in.stride(-1) == 1 ? dout_in : dout_in.contiguous();
  const Tensor out_c = out.stride(-1) == 1 ? out : out.contiguous();
  const Tensor lse_c = lse.contiguous();

  Tensor dq = at::empty({p.b, p.h, p.n_q, p.d}, q.options());
  Tensor dk = at::empty({p.b, p.h_kv, p.n_k, p.d}, q.options());
  Tensor dv = at::empty({p.b, p.h_kv, p.n_k, p.d_v}, q.options());
  Tensor dbias = bias_requires_grad ? at::empty(bias->sizes(), q.options()) : at::empty({0}, q.options());
  if (p.b * p.h * p.n_q * p.n_k == 0) {  // no score exists: every gradient is zero
    dq.zero_(), dk.zero_(), dv.zero_(), dbias.zero_();
    return {dq, dk, dv, dbias};
  }
  p.o = const_cast<void*>(out_c.data_ptr()), p.lse = const_cast<void*>(lse_c.data_ptr());
  p.o_sb = out_c.stride(0), p.o_sh = out_c.stride(1), p.o_sn = out_c.stride(2);
  p.dout = dout.data_ptr();
  const auto do_s = bhn_strides(dout);
  p.do_sb = do_s[0], p.do_sh = do_s[1], p.do_sn = do_s[2];
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  if (bias_requires_grad) {
    p.dbias = dbias.data_ptr();
    const Strided4 s = broadcast_strides(dbias, "bias", {p.b, p.h, p.n_q, p.n_k});
    p.dbias_s = s;
  }
  p.deterministic = at::globalContext().deterministicAlgorithms();
  if (q.is_cuda()) {
#ifdef FLASH_MHA_WITH_CUDA
    check_cuda_arch(q);
    const c10::cuda::CUDAGuard guard(q.device());
    const int64_t ws_bytes = cuda_bwd_workspace_bytes(p);
    Tensor ws = at::empty({std::max<int64_t>(ws_bytes, 1)}, q.options().dtype(at::kByte));  // cuda_bwd zeroes it
    cuda_bwd(p, ws.data_ptr(), at::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
    FMHA_CHECK(false, "flash_mha was built without CUDA");
#endif
  } else {
    cpu_bwd(p);
  }
  return {dq, dk, dv, dbias};
}

// Autograd of fwd, in C++ (torch.library's Python autograd wrapper cost ~20 us a call): the backward
// recomputes attention probabilities from the saved log-sum-exp with the bwd op; lse and the rng
// state are auxiliary outputs without gradient. Optional tensors are inputs (autograd edges) only
// when present, so the bias's edge is 3 whenever there is a bias.
class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  using variable_list = torch::autograd::variable_list;
  using Context = torch::autograd::AutogradContext;

  static variable_list forward(Context* ctx, const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& bias,
                               const OptTensor& mask, double scale, int64_t causal, double dropout_p,
                               const OptTensor& rng_state) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("flash_mha::fwd", "").typed<decltype(fwd)>();
    auto [out, lse, rng_out] = op.call(q, k, v, bias, mask, scale, causal, dropout_p, rng_state);
    ctx->save_for_backward({q, k, v, out, lse, bias.value_or(Tensor()), mask.value_or(Tensor()), rng_out});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->mark_non_differentiable({lse, rng_out});
    return {out, lse, rng_out};
  }

  static variable_list backward(Context* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("flash_mha::bwd", "").typed<decltype(bwd)>();
    const variable_list s = ctx->get_saved_variables();
    const double scale = ctx->saved_data["scale"].toDouble();
    const int64_t causal = ctx->saved_data["causal"].toInt();
    const double dropout_p = ctx->saved_data["dropout_p"].toDouble();
    const bool bias_grad = s[5].defined() && ctx->needs_input_grad(3);
    auto [dq, dk, dv, dbias] = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], opt(s[5]), opt(s[6]), scale, causal,
                                       dropout_p, dropout_p > 0.0 ? opt(s[7]) : OptTensor(), bias_grad);
    return {dq, dk, dv, bias_grad ? dbias : Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }

 private:
  static OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }
};

std::tuple<Tensor, Tensor, Tensor> fwd_autograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                const OptTensor& bias, const OptTensor& mask, double scale,
                                                int64_t causal, double dropout_p, const OptTensor& rng_state) {
  auto r = AttentionFunction::apply(q, k, v, bias, mask, scale, causal, dropout_p, rng_state);
  return {r[0], r[1], r[2]};
}

// Forces a CUDA kernel path for later calls (0 auto, 1 simt, 2 sm80, 3 sm90); returns the previous one.
int64_t set_cuda_path(int64_t path) {
  FMHA_CHECK(path >= 0 && path <= 3, "flash_mha: kernel path must be 0 (auto), 1 (simt), 2 (sm80) or 3 (sm90), got ",
              path);
  return g_cuda_path.exchange(static_cast<int>(path));
}

bool built_with_cuda() {
#ifdef FLASH_MHA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

// The library's contract. q [b, h, n_q, d], k [b, h_kv, n_k, d], v [b, h_kv, n_k, d_v]; bias/mask
// 4-d, each dim 1 or full; causal 0 none / 1 top-left / 2 bottom-right; rng_state int64 [seed, offset].
TORCH_LIBRARY(flash_mha, m) {
  m.def("fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? mask, float scale, int causal, "
        "float dropout_p, Tensor? rng_state) -> (Tensor out, Tensor lse, Tensor rng_state_out)");
  m.def("bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? bias, Tensor? mask, "
        "float scale, int causal, float dropout_p, Tensor? rng_state, bool bias_requires_grad) "
        "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)");
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def("set_cuda_path(int path) -> int", &set_cuda_path);
}

TORCH_LIBRARY_IMPL(flash_mha, Autograd, m) { m.impl("fwd", &fwd_autograd); }

TORCH_LIBRARY_IMPL(flash_mha, CPU, m) {
  m.impl("fwd", &fwd);
  m.impl("bwd", &bwd);
}

#ifdef FLASH_MHA_WITH_CUDA
TORCH_LIBRARY_IMPL(flash_mha, CUDA, m) {
  m.impl("fwd", &fwd);
  m.impl("bwd", &bwd);
}
#endif

}  // namespace flash_mha
