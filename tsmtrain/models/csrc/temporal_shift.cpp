// Temporal shift (Lin, Gan, Han, ICCV 2019, sec. 3) as a native PyTorch operator for CPU tensors.
//
//   tsmtrain::temporal_shift(Tensor x, int num_segments, int fold, bool reverse) -> Tensor
//
// x is (N*T, C, H, W), contiguous or channels_last, of any dtype up to 16 bytes. The result has x's
// shape, dtype and memory format:
//   channels [a, a+fold): frame t takes frame t+1 (zero at each clip's last frame)
//   channels [b, b+fold): frame t takes frame t-1 (zero at each clip's first frame)
//   channels [2*fold, C): unchanged
// with (a, b) = (0, fold), or (fold, 0) when `reverse` (the transpose: the gradient's shift).
// A bad shape raises ValueError in Python (TORCH_CHECK_VALUE).
//
// Every output element is written exactly once, into an uninitialised tensor, split over torch's
// intra-op threads where a copy of x would be. Contiguous: per frame, three memcpy runs, the same
// memory traffic as a copy. channels_last: per pixel, three short runs of compile-time length.
// The autograd kernel's backward node is the same operator with `reverse` flipped (so double
// backward works too); where no gradient is needed the call skips autograd's bookkeeping.
// tsmtrain/models/shift.py builds this file on first use (torch.utils.cpp_extension) and calls it
// through the Python binding at the end; where it cannot be built it falls back to its
// pure-PyTorch shift. Both give bitwise the same result.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/extension.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

using at::Tensor;

struct Bytes16 {  // an element of a 16-byte dtype (complex128): only ever copied
  uint64_t low, high;
};

// The output is a sequence of units: a frame (contiguous: C*H*W elements) or a pixel
// (channels_last: C elements). Every unit is three runs: [0, run) and [run, 2*run) (run = fold*H*W,
// or fold) taken from the same unit of frame t+1 or t-1 (zeros past the clip), and [2*run, unit)
// from the unit itself.
//
// Both layouts go parallel exactly where a copy of the tensor does (TensorIterator's grain of
// 32768 elements) and stay on the calling thread where a copy does: waking a second thread costs
// microseconds, as much as the whole copy of a small activation.

// Copies [lo, hi) of a unit: the parts of its three runs that fall inside. `first` and `second`
// point at the same unit in the frame the runs come from (nullptr: past the clip, zeros).
template <typename E>
inline void copy_part(E* out, const E* in, const E* first, const E* second, int64_t run, int64_t unit,
                      int64_t lo, int64_t hi) {
  auto piece = [&](int64_t begin, int64_t end, const E* src) {
    begin = std::max(begin, lo);
    end = std::min(end, hi);
    if (begin >= end) return;
    if (src) std::memcpy(out + begin, src + begin, (end - begin) * sizeof(E));
    else std::memset(out + begin, 0, (end - begin) * sizeof(E));
  };
  piece(0, run, first);
  piece(run, 2 * run, second);
  piece(2 * run, unit, in);
}

// Units [u0, u1) of one frame, whole. With F > 0 (channels_last, fold 8..256, run == F) every
// copy has a length the compiler knows, so it is a few vector moves and no library call, and the
// unshifted rest goes in blocks of F; with F == 0, library memcpy/memset of any length.
template <typename E, int64_t F>
inline void copy_units(E* out, const E* in, const E* first, const E* second, int64_t run, int64_t unit,
                       int64_t u0, int64_t u1) {
  if constexpr (F == 0) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t o = u * unit;
      copy_part(out + o, in + o, first ? first + o : nullptr, second ? second + o : nullptr, run, unit, 0, unit);
    }
  } else {
    for (int64_t o = u0 * unit; o < u1 * unit; o += unit) {
      E* __restrict dst = out + o;
      if (first) std::memcpy(dst, first + o, F * sizeof(E));
      else std::memset(dst, 0, F * sizeof(E));
      if (second) std::memcpy(dst + F, second + o + F, F * sizeof(E));
      else std::memset(dst + F, 0, F * sizeof(E));
      const E* src = in + o;
      int64_t k = 2 * F;
      for (; k + F <= unit; k += F) std::memcpy(dst + k, src + k, F * sizeof(E));
      for (; k < unit; ++k) dst[k] = src[k];
    }
  }
}

// Contiguous: units are frames (run = fold*H*W). The output's elements are split over the threads
// as a copy's are; a thread's range may begin or end inside a frame.
template <typename E>
void shift_contiguous(const E* x, E* y, int64_t numel, int64_t frame, int64_t t, int64_t run, bool reverse) {
  at::parallel_for(0, numel, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    for (int64_t f = begin / frame, pos = begin; pos < end; ++f) {
      const int64_t i = f % t, base = f * frame, stop = std::min(end, base + frame);
      const E* in = x + base;
      const E* later = i + 1 < t ? in + frame : nullptr;  // frame t+1
      const E* earlier = i > 0 ? in - frame : nullptr;    // frame t-1
      copy_part(y + base, in, reverse ? earlier : later, reverse ? later : earlier, run, frame, pos - base,
                stop - base);
      pos = stop;
    }
  });
}

// channels_last: units are pixels (run = fold). Each pixel's shifted channels come from the same
// pixel one frame later and one earlier, so walking a frame in memory order reads three streams,
// and every cache line of shifted channels is read twice (for frame t-1 and for frame t+1), a
// quarter more lines than a copy for fp32 with fold 8. Instead a task takes a block of pixels
// (about 16 KB of each frame) through all T frames of one clip, in frame order: the neighbours'
// lines are still in cache when they are read again. Tasks are (clip, pixel block); the shift goes
// parallel where a copy of the same number of elements would.
template <typename E, int64_t F>
void shift_channels_last(const E* x, E* y, int64_t clips, int64_t t, int64_t c, int64_t hw, int64_t fold,
                         bool reverse) {
  const int64_t frame = c * hw;
  const int64_t block = std::max<int64_t>(1, 16384 / static_cast<int64_t>(c * sizeof(E)));  // pixels
  const int64_t blocks = (hw + block - 1) / block;
  const int64_t grain = at::internal::GRAIN_SIZE / std::max<int64_t>(1, t * std::min(block, hw) * c);
  at::parallel_for(0, clips * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, p0 = (task % blocks) * block, p1 = std::min(hw, p0 + block);
      for (int64_t i = 0; i < t; ++i) {
        const int64_t base = (n * t + i) * frame;
        const E* in = x + base;
        const E* later = i + 1 < t ? in + frame : nullptr;
        const E* earlier = i > 0 ? in - frame : nullptr;
        copy_units<E, F>(y + base, in, reverse ? earlier : later, reverse ? later : earlier, fold, c, p0, p1);
      }
    }
  });
}

template <typename E>
void shift_dense(const Tensor& x, Tensor& y, int64_t t, int64_t fold, bool reverse, bool channels_last) {
  const int64_t clips = x.size(0) / t, c = x.size(1), hw = x.size(2) * x.size(3);
  const E* src = static_cast<const E*>(x.const_data_ptr());
  E* dst = static_cast<E*>(y.mutable_data_ptr());
  if (!channels_last) return shift_contiguous<E>(src, dst, x.numel(), c * hw, t, fold * hw, reverse);
  switch (fold) {
    case 8: return shift_channels_last<E, 8>(src, dst, clips, t, c, hw, fold, reverse);
    case 16: return shift_channels_last<E, 16>(src, dst, clips, t, c, hw, fold, reverse);
    case 32: return shift_channels_last<E, 32>(src, dst, clips, t, c, hw, fold, reverse);
    case 64: return shift_channels_last<E, 64>(src, dst, clips, t, c, hw, fold, reverse);
    case 128: return shift_channels_last<E, 128>(src, dst, clips, t, c, hw, fold, reverse);
    case 256: return shift_channels_last<E, 256>(src, dst, clips, t, c, hw, fold, reverse);
    default: return shift_channels_last<E, 0>(src, dst, clips, t, c, hw, fold, reverse);
  }
}

Tensor temporal_shift_cpu(const Tensor& input, int64_t t, int64_t fold, bool reverse) {
  TORCH_CHECK_VALUE(input.layout() == at::kStrided, "temporal_shift: expected a dense (strided) tensor, got ",
                    input.layout());
  TORCH_CHECK_VALUE(input.dim() == 4, "temporal_shift: expected (N*T, C, H, W) activations, got shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(t >= 1 && input.size(0) % t == 0, "temporal_shift: leading dimension ", input.size(0),
              " is not a multiple of num_segments=", t);
  TORCH_CHECK_VALUE(fold >= 0 && 2 * fold <= input.size(1), "temporal_shift: fold ", fold, " does not fit ",
              input.size(1), " channels");
  // a channels_last tensor with H = W = 1 is also contiguous: either order is the same memory
  const bool channels_last = !input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast);
  const Tensor x = channels_last || input.is_contiguous() ? input : input.contiguous();
  Tensor y = at::empty_like(x);  // keeps x's (dense) strides, so its memory format
  if (x.numel() == 0) return y;
  switch (x.element_size()) {
    case 1: shift_dense<uint8_t>(x, y, t, fold, reverse, channels_last); break;
    case 2: shift_dense<uint16_t>(x, y, t, fold, reverse, channels_last); break;
    case 4: shift_dense<uint32_t>(x, y, t, fold, reverse, channels_last); break;
    case 8: shift_dense<uint64_t>(x, y, t, fold, reverse, channels_last); break;
    case 16: shift_dense<Bytes16>(x, y, t, fold, reverse, channels_last); break;  // complex128
    default: TORCH_CHECK_VALUE(false, "temporal_shift: unsupported dtype ", x.scalar_type());
  }
  return y;
}

Tensor temporal_shift_autograd(const Tensor& x, int64_t t, int64_t fold, bool reverse);

// The operator below autograd: straight to the CPU kernel.
Tensor call_below_autograd(const Tensor& x, int64_t t, int64_t fold, bool reverse) {
  at::AutoDispatchBelowADInplaceOrView guard;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("tsmtrain::temporal_shift", "")
                       .typed<Tensor(const Tensor&, int64_t, int64_t, bool)>();
  return op.call(x, t, fold, reverse);
}

// The backward node, written as PyTorch's generated ones are (a Node subclass that holds the
// shift's parameters; no saved tensors, the shift being linear) rather than with the
// torch::autograd::Function helper, whose context and output wrapping cost about 12 microseconds
// per forward+backward, as much as the shift of a small activation. Written against PyTorch
// 2.14's Node API (nodes held by c10::intrusive_ptr); where it does not compile, shift.py falls
// back to its Python shift.
struct TemporalShiftBackward final : torch::autograd::Node {
  TemporalShiftBackward(int64_t t, int64_t fold, bool reverse, torch::autograd::edge_list&& next)
      : Node(std::move(next)), t(t), fold(fold), reverse(reverse) {}

  // the gradient of a shift is the opposite shift of the incoming gradient; through autograd
  // again, so that double backward (create_graph) records it too
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    torch::autograd::variable_list out(1);
    if (grads[0].defined() && should_compute_output(0)) out[0] = temporal_shift_autograd(grads[0], t, fold, !reverse);
    return out;
  }
  std::string name() const override { return "TemporalShiftBackward"; }

  const int64_t t, fold;
  const bool reverse;
};

// Records a graph node only where a gradient will flow: with grad mode off (inference, or the
// backward pass itself without create_graph) or an input that needs none, this is the kernel
// alone, as PyTorch's own operators are.
Tensor temporal_shift_autograd(const Tensor& x, int64_t t, int64_t fold, bool reverse) {
  Tensor y = call_below_autograd(x, t, fold, reverse);
  if (at::GradMode::is_enabled() && x.requires_grad()) {
    auto node = c10::make_intrusive<TemporalShiftBackward>(t, fold, reverse, torch::autograd::collect_next_edges(x));
    torch::autograd::set_history(y, node);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(tsmtrain, m) {
  m.def("temporal_shift(Tensor x, int num_segments, int fold, bool reverse) -> Tensor");
}

TORCH_LIBRARY_IMPL(tsmtrain, CPU, m) { m.impl("temporal_shift", temporal_shift_cpu); }

TORCH_LIBRARY_IMPL(tsmtrain, Autograd, m) { m.impl("temporal_shift", temporal_shift_autograd); }

// The same operator as a plain Python function: torch.ops' generic boxed call (argument parsing
// against the schema, a stack) costs about 2 microseconds more per call than this binding, as
// much as the copy of a small activation takes. It enters at the top of the dispatcher, so
// autograd, autocast and every other dispatch key behave exactly as through torch.ops.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def(
      "temporal_shift",
      [](const Tensor& x, int64_t num_segments, int64_t shift_div) {
        TORCH_CHECK_VALUE(x.dim() == 4, "temporal_shift: expected (N*T, C, H, W) activations, got shape ", x.sizes());
        TORCH_CHECK_VALUE(shift_div >= 1, "temporal_shift: shift_div must be at least 1, got ", shift_div);
        static auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tsmtrain::temporal_shift", "")
                             .typed<Tensor(const Tensor&, int64_t, int64_t, bool)>();
        return op.call(x, num_segments, x.size(1) / shift_div, false);
      },
      "temporal_shift(x, num_segments, shift_div) -> Tensor: tsmtrain.models.shift.temporal_shift on a CPU "
      "tensor, through torch.ops.tsmtrain.temporal_shift; raises ValueError for a bad shape",
      pybind11::arg("x"), pybind11::arg("num_segments"), pybind11::arg("shift_div"));
}
