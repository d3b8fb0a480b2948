// Temporal shift (Lin, Gan, Han, ICCV 2019, sec. 3) as a native PyTorch operator for CPU tensors.
//
//   tsmtrain::temporal_shift(Tensor x, int num_segments, int fold, bool reverse) -> Tensor
//
// x is (N*T, C, H, W), contiguous or channels_last, of any 1-, 2-, 4- or 8-byte dtype. The result has
// x's shape, dtype and memory format:
//   channels [a, a+fold): frame t takes frame t+1 (zero at each clip's last frame)
//   channels [b, b+fold): frame t takes frame t-1 (zero at each clip's first frame)
//   channels [2*fold, C): unchanged
// with (a, b) = (0, fold), or (fold, 0) when `reverse` (the transpose: the gradient's shift).
//
// Every output element is written exactly once, in one pass over the output in memory order,
// split over torch's intra-op threads: the same memory traffic as a copy of x. The autograd
// kernel's backward is the same operator with `reverse` flipped (so double backward works too).
// tsmtrain/models/shift.py builds this file on first use (torch.utils.cpp_extension) and falls
// back to its pure-PyTorch shift where it cannot; both give bitwise the same result.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace {

using at::Tensor;

// Contiguous (N*T, C, H, W): per frame, three runs of channels (each fold*H*W or (C-2*fold)*H*W
// elements) copied from frames t+1, t-1, t, or zeroed past the clip.
template <typename E>
void shift_contiguous(const E* x, E* y, int64_t frames, int64_t t, int64_t c, int64_t hw, int64_t fold,
                      bool reverse) {
  const int64_t frame = c * hw, group = fold * hw;
  const int64_t a = (reverse ? fold : 0) * hw, b = (reverse ? 0 : fold) * hw, rest = 2 * group;
  // tasks: (frame, part) pairs, so that a few large frames still spread over the threads
  at::parallel_for(0, frames * 3, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t f = task / 3, part = task % 3, i = f % t;
      E* out = y + f * frame;
      const E* in = x + f * frame;
      if (part == 0) {
        if (i + 1 < t) std::memcpy(out + a, in + frame + a, group * sizeof(E));
        else std::memset(out + a, 0, group * sizeof(E));
      } else if (part == 1) {
        if (i > 0) std::memcpy(out + b, in - frame + b, group * sizeof(E));
        else std::memset(out + b, 0, group * sizeof(E));
      } else {
        std::memcpy(out + rest, in + rest, (frame - rest) * sizeof(E));
      }
    }
  });
}

// A run of n elements, in 32-byte blocks of a size the compiler knows (vector moves, no call),
// then the tail.
template <typename E>
inline void copy_run(E* __restrict out, const E* __restrict in, int64_t n) {
  constexpr int64_t block = 32 / sizeof(E);
  int64_t k = 0;
  for (; k + block <= n; k += block) std::memcpy(out + k, in + k, 32);
  for (; k < n; ++k) out[k] = in[k];
}

template <typename E>
inline void zero_run(E* out, int64_t n) {
  std::memset(out, 0, n * sizeof(E));
}

// channels_last (N*T, H, W, C) in memory: per pixel, the same three runs of fold, fold and
// C - 2*fold channels; pixels are split over the threads in blocks. Runs are short (fold is 8
// floats for 64 channels), so for the usual fold sizes the run length F is a compile-time
// constant and every copy is a few vector moves (F = 0 is the generic loop).
template <typename E, int64_t F>
void shift_channels_last(const E* x, E* y, int64_t frames, int64_t t, int64_t c, int64_t hw, int64_t fold,
                         bool reverse) {
  const int64_t frame = c * hw;
  const int64_t a = reverse ? fold : 0, b = reverse ? 0 : fold, rest = 2 * fold;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(c, 1));
  at::parallel_for(0, frames * hw, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t i = (p / hw) % t;
      E* out = y + p * c;
      const E* in = x + p * c;
      if constexpr (F > 0) {
        if (i + 1 < t) std::memcpy(out + a, in + frame + a, F * sizeof(E));
        else std::memset(out + a, 0, F * sizeof(E));
        if (i > 0) std::memcpy(out + b, in - frame + b, F * sizeof(E));
        else std::memset(out + b, 0, F * sizeof(E));
        int64_t k = rest;
        for (; k + F <= c; k += F) std::memcpy(out + k, in + k, F * sizeof(E));
        for (; k < c; ++k) out[k] = in[k];
      } else {
        if (i + 1 < t) copy_run(out + a, in + frame + a, fold);
        else zero_run(out + a, fold);
        if (i > 0) copy_run(out + b, in - frame + b, fold);
        else zero_run(out + b, fold);
        copy_run(out + rest, in + rest, c - rest);
      }
    }
  });
}

template <typename E>
void shift_dense(const Tensor& x, Tensor& y, int64_t t, int64_t fold, bool reverse, bool channels_last) {
  const int64_t frames = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  const E* src = static_cast<const E*>(x.const_data_ptr());
  E* dst = static_cast<E*>(y.mutable_data_ptr());
  if (!channels_last) return shift_contiguous<E>(src, dst, frames, t, c, hw, fold, reverse);
  switch (fold) {
    case 8: return shift_channels_last<E, 8>(src, dst, frames, t, c, hw, fold, reverse);
    case 16: return shift_channels_last<E, 16>(src, dst, frames, t, c, hw, fold, reverse);
    case 32: return shift_channels_last<E, 32>(src, dst, frames, t, c, hw, fold, reverse);
    case 64: return shift_channels_last<E, 64>(src, dst, frames, t, c, hw, fold, reverse);
    case 128: return shift_channels_last<E, 128>(src, dst, frames, t, c, hw, fold, reverse);
    case 256: return shift_channels_last<E, 256>(src, dst, frames, t, c, hw, fold, reverse);
    default: return shift_channels_last<E, 0>(src, dst, frames, t, c, hw, fold, reverse);
  }
}

Tensor temporal_shift_cpu(const Tensor& input, int64_t t, int64_t fold, bool reverse) {
  TORCH_CHECK(input.dim() == 4, "temporal_shift: expected (N*T, C, H, W), got ", input.sizes());
  TORCH_CHECK(t >= 1 && input.size(0) % t == 0, "temporal_shift: leading dimension ", input.size(0),
              " is not a multiple of num_segments=", t);
  TORCH_CHECK(fold >= 0 && 2 * fold <= input.size(1), "temporal_shift: fold ", fold, " does not fit ",
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
    default: TORCH_CHECK(false, "temporal_shift: unsupported dtype ", x.scalar_type());
  }
  return y;
}

class TemporalShiftFunction : public torch::autograd::Function<TemporalShiftFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, int64_t t, int64_t fold,
                        bool reverse) {
    ctx->saved_data["t"] = t;
    ctx->saved_data["fold"] = fold;
    ctx->saved_data["reverse"] = reverse;
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("tsmtrain::temporal_shift", "")
                         .typed<Tensor(const Tensor&, int64_t, int64_t, bool)>();
    return op.call(x, t, fold, reverse);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const int64_t t = ctx->saved_data["t"].toInt(), fold = ctx->saved_data["fold"].toInt();
    const bool reverse = ctx->saved_data["reverse"].toBool();
    return {TemporalShiftFunction::apply(grads[0], t, fold, !reverse), Tensor(), Tensor(), Tensor()};
  }
};

Tensor temporal_shift_autograd(const Tensor& x, int64_t t, int64_t fold, bool reverse) {
  return TemporalShiftFunction::apply(x, t, fold, reverse);
}

}  // namespace

TORCH_LIBRARY(tsmtrain, m) {
  m.def("temporal_shift(Tensor x, int num_segments, int fold, bool reverse) -> Tensor");
}

TORCH_LIBRARY_IMPL(tsmtrain, CPU, m) { m.impl("temporal_shift", temporal_shift_cpu); }

TORCH_LIBRARY_IMPL(tsmtrain, Autograd, m) { m.impl("temporal_shift", temporal_shift_autograd); }
