// The GEMMs of a quantized Linear as a C++ autograd function (linear_op.py says why).
//
// The same arithmetic as `linear._QuantizedLinearFunction`, op for op, so the two are
// bit-identical (tested): the operands arrive cast (by Python, which owns the scale histories,
// random streams and statistics), each carrying a scale that is a float or a 0-d tensor; the
// backward node calls Python back once, to cast the incoming gradient. It is a plain autograd
// Node, as torch's own operators make theirs: its edges go to x, the weight and the bias.

#include <torch/extension.h>
#include <torch/csrc/autograd/functions/utils.h>

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

// The backward of one quantized Linear: its cast operands, their scales, and the Python callable
// that casts the incoming gradient (held under the GIL, released under it).
struct QuantizedLinearBackward : public torch::autograd::Node {
  Tensor qx, qw;
  IValue sx, sw;
  bool exact = true, wide = false, has_bias = false;
  at::ScalarType x_dtype = at::kFloat, w_dtype = at::kFloat, b_dtype = at::kFloat;
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
    {
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

Tensor quantized_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& qx,
                        const Tensor& qw, py::object sx_obj, py::object sw_obj, bool exact, bool wide,
                        at::ScalarType out_dtype, py::object cast_gradient) {
  IValue sx = to_scale(sx_obj), sw = to_scale(sw_obj);
  bool has_bias = bias.has_value() && bias->defined();
  Tensor y;
  {
    py::gil_scoped_release no_gil;  // like torch's own Python bindings: other threads run meanwhile
    at::NoGradGuard no_grad;
    // The caller has switched autocast off where the GEMM dtype asks for it; bf16 operands are
    // left alone by autocast, so no autocast at all here is the same arithmetic.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    IValue inv = times(inverse(sx), inverse(sw));  // not 1/(sx sw): that product can overflow float32
    Tensor gx = wide ? qx.to(at::kFloat) : qx, gw = wide ? qw.to(at::kFloat) : qw;
    std::optional<Tensor> b;
    if (has_bias) b = bias->detach().to(gw.scalar_type());
    if (exact) {
      y = at::linear(gx, unscale(gw, inv), b);
    } else {
      y = unscale(at::linear(gx, gw).to(at::kFloat), inv);
      if (b.has_value()) y = y + *b;
      y = y.to(gw.scalar_type());
    }
    if (y.scalar_type() != out_dtype) y = y.to(out_dtype);
  }
  std::optional<Tensor> no_bias;
  const std::optional<Tensor>& b_edge = has_bias ? bias : no_bias;
  if (torch::autograd::compute_requires_grad(x, weight, b_edge)) {
    auto node = c10::make_intrusive<QuantizedLinearBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, weight, b_edge));
    node->qx = qx;
    node->qw = qw;
    node->sx = sx;
    node->sw = sw;
    node->exact = exact;
    node->wide = wide;
    node->has_bias = has_bias;
    node->x_dtype = x.scalar_type();
    node->w_dtype = weight.scalar_type();
    if (has_bias) node->b_dtype = bias->scalar_type();
    node->cast_gradient = std::move(cast_gradient);
    torch::autograd::set_history(y, node);
  }
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantized_linear", &quantized_linear, "The GEMMs of a quantized Linear on cast operands (autograd).");
}
