// The GEMMs of a quantized Linear as a C++ autograd function (linear_op.py says why).
//
// The same arithmetic as `linear._QuantizedLinearFunction`, op for op, so the two are
// bit-identical (tested). The operands arrive cast by Python, which owns the scale histories,
// random streams and statistics, each carrying a scale that is a float or a 0-d tensor; or, for
// streams in the common configuration (nearest rounding, current power-of-two amax scaling, a CPU
// tensor, no statistics being collected), they are cast here by a `NativeStream`: the very call
// `native.cast` makes to native.c's kernel, without Python in between. The backward casts the
// incoming gradient the same way, or calls Python back once to do it. It is a plain autograd
// Node, as torch's own operators make theirs: its edges go to x, the weight and the bias.

#include <torch/extension.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <memory>
#include <utility>

namespace {

using at::Tensor;
using c10::IValue;
using torch::autograd::variable_list;

// A carried scale, or a product of inverses: a double (CPU) or a 0-d tensor (an accelerator).
IValue to_scale(const py::handle& value) {
  if (THPVariable_Check(value.ptr())) return IValue(THPVariable_Unpack(value.ptr()));
  return IValue(value.cast<double>());
}

// Python's 1.0 / s: float division, or Tensor.__rtruediv__ (reciprocal, times 1.0: exact).
IValue inverse(const IValue& s) {
  return s.isTensor() ? IValue(at::reciprocal(s.toTensor())) : IValue(1.0 / s.toDouble());
}

// Python's a * b for floats and 0-d tensors.
IValue times(const IValue& a, const IValue& b) {
  if (a.isTensor()) return IValue(b.isTensor() ? a.toTensor() * b.toTensor() : a.toTensor() * b.toDouble());
  if (b.isTensor()) return IValue(b.toTensor() * a.toDouble());
  return IValue(a.toDouble() * b.toDouble());
}

// `linear._unscale`: t * inverse, no pass at all where inverse is exactly 1.0.
Tensor unscale(const Tensor& t, const IValue& inv) {
  if (inv.isTensor()) return t * inv.toTensor();
  return inv.toDouble() == 1.0 ? t : t * inv.toDouble();
}

// native.c's operand cast (`altgrad_cast`; its comment there says what each argument means),
// reached by the address linear_op.py takes from the ctypes library: one compiled kernel, two
// callers.
using CastKernel = float (*)(const void* x, int in_type, int64_t n, const float* reference_amax,
                             const int32_t* params, int32_t margin, const int64_t* seed, void* out, int out_type,
                             int threads, float* amax_out, int dequantize, int* dequantized_out, float guess);

// native.py's _TYPES; -1: a dtype the kernel does not take
int native_type(at::ScalarType t) { return t == at::kFloat ? 0 : t == at::kBFloat16 ? 1 : -1; }

// One operand stream in the common configuration, cast by native.c exactly as
// `OperandQuantizer` -> `cast_operand` -> `native.cast` casts it there: nearest rounding, current
// amax scaling (no history), power-of-two scales, dequantized values where that is exact. `scale`
// is the stream's last scale (0: none yet), its next cast's guess; `active` is false while the
// stream collects statistics (Python casts it then).
struct NativeStream {
  CastKernel kernel;
  Tensor params;  // `quantize._params(fmt, True, cpu)`: int32
  int32_t margin;  // clamped as native.cast clamps it
  float scale = 0.0f;
  bool active = true;

  NativeStream(int64_t kernel_address, Tensor params_, int64_t margin_)
      : kernel(reinterpret_cast<CastKernel>(kernel_address)),
        params(std::move(params_)),
        margin(static_cast<int32_t>(std::max<int64_t>(-1024, std::min<int64_t>(1024, margin_)))) {
    TORCH_CHECK(kernel != nullptr, "no native cast kernel");
    TORCH_CHECK(params.device().is_cpu() && params.scalar_type() == at::kInt && params.is_contiguous(),
                "params must be a contiguous CPU int32 tensor");
  }

  // Whether this stream casts x here (else Python does).
  bool takes(const Tensor& x) const {
    return active && x.device().is_cpu() && native_type(x.scalar_type()) >= 0 && x.numel() > 0;
  }

  // (values in dtype, the scale they carry: 1.0 where dequantized), as `OperandQuantizer` returns.
  std::pair<Tensor, double> cast(const Tensor& x, at::ScalarType dtype) {
    TORCH_CHECK(native_type(dtype) >= 0, "the native cast writes float32 or bfloat16");
    Tensor in = x.contiguous();
    Tensor out = at::empty(in.sizes(), in.options().dtype(dtype));
    float amax = 0.0f;
    int dequantized = 0;
    scale = kernel(in.data_ptr(), native_type(in.scalar_type()), in.numel(), nullptr, params.data_ptr<int32_t>(),
                   margin, nullptr, out.data_ptr(), native_type(dtype), at::get_num_threads(), &amax, 1, &dequantized,
                   scale);
    return {out, dequantized ? 1.0 : static_cast<double>(scale)};
  }
};

// The backward of one quantized Linear: its cast operands, their scales, the gradient stream's
// native cast where it has one, and the Python callable that casts the incoming gradient
// otherwise (held under the GIL, released under it).
struct QuantizedLinearBackward : public torch::autograd::Node {
  Tensor qx, qw;
  IValue sx, sw;
  bool exact = true, wide = false, has_bias = false;
  at::ScalarType x_dtype = at::kFloat, w_dtype = at::kFloat, b_dtype = at::kFloat, gemm_dtype = at::kBFloat16;
  std::shared_ptr<NativeStream> grad_stream;
  py::object cast_gradient;

  ~QuantizedLinearBackward() override {
    if (cast_gradient) {
      py::gil_scoped_acquire gil;
      cast_gradient = py::object();
    }
  }

  std::string name() const override { return "QuantizedLinearBackward"; }

  void release_variables() override {
    qx.reset();
    qw.reset();
  }

  variable_list apply(variable_list&& grads) override {
    const Tensor& grad_y = grads[0];
    Tensor gx_ = qx, gw_ = qw, qg;
    IValue sg;
    if (grad_stream && grad_stream->takes(grad_y)) {
      auto cast = grad_stream->cast(grad_y, gemm_dtype);
      qg = cast.first;
      sg = IValue(cast.second);
    } else {
      py::gil_scoped_acquire gil;
      py::tuple result = cast_gradient(grad_y);
      qg = THPVariable_Unpack(result[0].ptr());
      sg = to_scale(result[1]);
    }
    if (wide) {  // fp32: float32 GEMMs on the exact grid values, as in the forward
      gx_ = gx_.to(at::kFloat);
      gw_ = gw_.to(at::kFloat);
      qg = qg.to(at::kFloat);
    }
    variable_list out(3);
    if (should_compute_output(0)) {
      IValue inv = times(inverse(sg), inverse(sw));
      Tensor g = exact ? at::matmul(qg, unscale(gw_, inv)) : unscale(at::matmul(qg, gw_).to(at::kFloat), inv);
      out[0] = g.to(x_dtype);
    }
    if (should_compute_output(1)) {
      Tensor g2 = qg.reshape({-1, qg.size(-1)}).t(), x2 = gx_.reshape({-1, gx_.size(-1)});
      Tensor g;
      if (exact) {
        // The activation's unscale goes in before the GEMM: the product of two scaled operands
        // can pass float32's range (E7M0 x E7M0: 2^128).
        g = unscale(at::mm(g2, unscale(x2, inverse(sx))), inverse(sg));
      } else {
        g = unscale(at::mm(g2, x2).to(at::kFloat), times(inverse(sg), inverse(sx)));
      }
      out[1] = g.to(w_dtype);
    }
    if (has_bias && should_compute_output(2)) {
      out[2] = grad_y.reshape({-1, grad_y.size(-1)}).sum(0).to(b_dtype);
    }
    return out;
  }
};

// y from the cast operands, with no autograd (the caller holds no GIL and no grad mode).
Tensor gemm(const Tensor& qx, const Tensor& qw, const IValue& sx, const IValue& sw, const std::optional<Tensor>& bias,
            bool exact, bool wide, at::ScalarType out_dtype) {
  // The caller has switched autocast off where the GEMM dtype asks for it; bf16 operands are
  // left alone by autocast, so no autocast at all here is the same arithmetic.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  IValue inv = times(inverse(sx), inverse(sw));  // not 1/(sx sw): that product can overflow float32
  Tensor gx = wide ? qx.to(at::kFloat) : qx, gw = wide ? qw.to(at::kFloat) : qw;
  std::optional<Tensor> b;
  if (bias.has_value()) b = bias->detach().to(gw.scalar_type());
  Tensor y;
  if (exact) {
    y = at::linear(gx, unscale(gw, inv), b);
  } else {
    y = unscale(at::linear(gx, gw).to(at::kFloat), inv);
    if (b.has_value()) y = y + *b;
    y = y.to(gw.scalar_type());
  }
  return y.scalar_type() == out_dtype ? y : y.to(out_dtype);
}

// y's history: the backward node, where x, the weight or the bias needs a gradient.
void attach(const Tensor& y, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
            const Tensor& qx, const Tensor& qw, IValue sx, IValue sw, bool exact, bool wide,
            std::shared_ptr<NativeStream> grad_stream, py::object cast_gradient) {
  if (!torch::autograd::compute_requires_grad(x, weight, bias)) return;
  auto node = c10::make_intrusive<QuantizedLinearBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias));
  node->qx = qx;
  node->qw = qw;
  node->sx = std::move(sx);
  node->sw = std::move(sw);
  node->exact = exact;
  node->wide = wide;
  node->has_bias = bias.has_value();
  node->x_dtype = x.scalar_type();
  node->w_dtype = weight.scalar_type();
  node->gemm_dtype = qw.scalar_type();
  if (bias.has_value()) node->b_dtype = bias->scalar_type();
  node->grad_stream = std::move(grad_stream);
  node->cast_gradient = std::move(cast_gradient);
  torch::autograd::set_history(y, node);
}

std::optional<Tensor> defined(const std::optional<Tensor>& bias) {
  return bias.has_value() && bias->defined() ? bias : std::nullopt;
}

// The GEMMs on operands Python has cast; the gradient cast by `grad_stream` where given and
// taking it, else by Python (`cast_gradient`).
Tensor quantized_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias_, const Tensor& qx,
                        const Tensor& qw, py::object sx_obj, py::object sw_obj, bool exact, bool wide,
                        at::ScalarType out_dtype, py::object cast_gradient, std::shared_ptr<NativeStream> grad_stream) {
  IValue sx = to_scale(sx_obj), sw = to_scale(sw_obj);
  std::optional<Tensor> bias = defined(bias_);
  Tensor y;
  {
    py::gil_scoped_release no_gil;  // like torch's own Python bindings: other threads run meanwhile
    at::NoGradGuard no_grad;
    y = gemm(qx, qw, sx, sw, bias, exact, wide, out_dtype);
  }
  attach(y, x, weight, bias, qx, qw, sx, sw, exact, wide, std::move(grad_stream), std::move(cast_gradient));
  return y;
}

// The whole layer where its activation and weight streams are native: both casts, the GEMMs,
// and the gradient cast by `grad_stream` where given and taking the gradient, else by Python.
Tensor cast_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias_,
                   std::shared_ptr<NativeStream> activation, std::shared_ptr<NativeStream> weight_stream,
                   std::shared_ptr<NativeStream> grad_stream, at::ScalarType dtype, bool exact, bool wide,
                   at::ScalarType out_dtype, py::object cast_gradient) {
  TORCH_CHECK(activation && weight_stream && activation->takes(x) && weight_stream->takes(weight),
              "cast_linear: the activation and weight streams must take x and the weight");
  std::optional<Tensor> bias = defined(bias_);
  Tensor y, qx, qw;
  double sx, sw;
  {
    py::gil_scoped_release no_gil;
    at::NoGradGuard no_grad;
    std::tie(qx, sx) = activation->cast(x, dtype);
    std::tie(qw, sw) = weight_stream->cast(weight, dtype);
    y = gemm(qx, qw, IValue(sx), IValue(sw), bias, exact, wide, out_dtype);
  }
  attach(y, x, weight, bias, qx, qw, IValue(sx), IValue(sw), exact, wide, std::move(grad_stream),
         std::move(cast_gradient));
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantized_linear", &quantized_linear, "The GEMMs of a quantized Linear on cast operands (autograd).",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("qx"), py::arg("qw"), py::arg("sx"), py::arg("sw"),
        py::arg("exact"), py::arg("wide"), py::arg("out_dtype"), py::arg("cast_gradient"),
        py::arg("grad_stream") = nullptr);
  m.def("cast_linear", &cast_linear, "A quantized Linear whose activation and weight streams are native (autograd).");
  py::class_<NativeStream, std::shared_ptr<NativeStream>>(m, "NativeStream")
      .def(py::init<int64_t, Tensor, int64_t>(), py::arg("kernel"), py::arg("params"), py::arg("margin"))
      .def_readwrite("scale", &NativeStream::scale)
      .def_readwrite("active", &NativeStream::active)
      .def("takes", &NativeStream::takes)
      .def("cast", [](NativeStream& self, const Tensor& x, at::ScalarType dtype) {
        py::gil_scoped_release no_gil;
        at::NoGradGuard no_grad;
        return self.cast(x, dtype);
      }, "(values, carried scale) of x, as OperandQuantizer casts it");
}
