// Index builders for the GPT data pipeline (Megatron-LM `helpers.cpp` semantics; docs/contracts.md, data format).
//
// build_sample_idx: walks the shuffled document order and records where each fixed-length sample starts, as
//   (position in document_idx, token offset in that document); samples span documents without padding and
//   consecutive samples overlap by `add_extra_token_to_sequence` tokens (the label shift).
// build_blending_indices: the deterministic greedy that interleaves several datasets so that, after every prefix
//   of i samples, dataset d has been drawn as close to weights[d] * i times as possible.
//
// The NumPy versions in engine/data/helpers.py must agree with these exactly; tests/data/test_helpers.py checks it.

#if defined(__GNUC__) && !defined(__clang__)
// The blending greedy compares w*i - c across datasets; a fused multiply-add would round differently from the
// NumPy/Python fallback (and from Megatron on machines without FMA), so keep the multiply and subtract separate.
#pragma GCC optimize("fp-contract=off")
#endif

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace py = pybind11;

namespace {

// Number of samples: whole sequences of seq_length tokens (plus the extra label token) in the token stream;
// with drop_last_partial_sequence=false the last, partial one counts too. Exact integer ceiling (Megatron uses a
// float32 ceil here, which misrounds beyond 2^24 tokens).
int64_t count_samples(int64_t total_tokens, int64_t seq_length, int64_t extra, bool drop_last) {
  const int64_t usable = total_tokens - extra;
  return drop_last ? usable / seq_length : (usable + seq_length - 1) / seq_length;
}

template <typename Out, typename DocIdx>
py::array_t<Out> sample_idx_impl(const int32_t *sizes, const DocIdx *document_idx,
                                 int64_t num_docs, int64_t seq_length, int64_t num_samples, int64_t extra) {
  std::vector<int64_t> shape = {num_samples + 1, 2};
  py::array_t<Out> result(shape);
  Out *out = result.mutable_data();
  bool ran_out = false;
  {
    py::gil_scoped_release release;
    out[0] = 0;
    out[1] = 0;
    int64_t doc = 0;     // position in document_idx
    int64_t offset = 0;  // token offset inside that document
    for (int64_t sample = 1; sample <= num_samples && !ran_out; ++sample) {
      int64_t remaining = seq_length + extra;
      while (remaining != 0) {
        const int64_t doc_len = static_cast<int64_t>(sizes[document_idx[doc]]) - offset;
        remaining -= doc_len;
        if (remaining <= 0) {
          // The sample ends inside this document; the next one starts `extra` tokens before that end.
          offset += remaining + doc_len - extra;
          remaining = 0;
        } else if (doc == num_docs - 1) {
          // Out of documents: only the final (partial) sample may end here.
          if (sample != num_samples) {
            ran_out = true;
            break;
          }
          offset = static_cast<int64_t>(sizes[document_idx[doc]]) - extra;
          break;
        } else {
          ++doc;
          offset = 0;
        }
      }
      out[2 * sample] = static_cast<Out>(doc);
      out[2 * sample + 1] = static_cast<Out>(offset);
    }
  }
  if (ran_out) {
    throw std::invalid_argument(
        "build_sample_idx: document_idx holds fewer tokens than num_epochs * tokens_per_epoch");
  }
  return result;
}

template <typename DocIdx>
py::array build_sample_idx_typed(const py::array_t<int32_t, py::array::c_style | py::array::forcecast> &sizes, const py::array &document_idx_any,
                                 int64_t seq_length, int64_t num_samples, int64_t extra) {
  const auto document_idx = py::array_t<DocIdx, py::array::c_style | py::array::forcecast>::ensure(document_idx_any);
  const int32_t *s = sizes.data();
  const int64_t num_sizes = sizes.shape(0);
  const DocIdx *d = document_idx.data();
  const int64_t num_docs = document_idx.shape(0);

  int32_t max_size = 0;
  for (int64_t i = 0; i < num_sizes; ++i) {
    if (s[i] < 0) throw std::invalid_argument("build_sample_idx: negative document length in sizes");
    max_size = std::max(max_size, s[i]);
  }
  for (int64_t i = 0; i < num_docs; ++i) {
    if (d[i] < 0 || static_cast<int64_t>(d[i]) >= num_sizes) {
      throw std::invalid_argument("build_sample_idx: document_idx entry " + std::to_string(i) +
                                  " is outside sizes (" + std::to_string(static_cast<int64_t>(d[i])) + ")");
    }
  }
  // Megatron's choice: int32 when every stored value (positions in document_idx, offsets) fits in it.
  const int64_t largest = std::max<int64_t>(num_docs, max_size);
  if (largest <= std::numeric_limits<int32_t>::max()) {
    return sample_idx_impl<int32_t, DocIdx>(s, d, num_docs, seq_length, num_samples, extra);
  }
  return sample_idx_impl<int64_t, DocIdx>(s, d, num_docs, seq_length, num_samples, extra);
}

py::array build_sample_idx(const py::array &sizes_any, const py::array &document_idx, int64_t seq_length,
                           int64_t num_epochs, int64_t tokens_per_epoch, bool drop_last_partial_sequence,
                           int64_t add_extra_token_to_sequence) {
  if (seq_length < 1) throw std::invalid_argument("build_sample_idx: seq_length must be >= 1");
  if (num_epochs < 1) throw std::invalid_argument("build_sample_idx: num_epochs must be >= 1");
  if (tokens_per_epoch < 1) throw std::invalid_argument("build_sample_idx: tokens_per_epoch must be >= 1");
  if (add_extra_token_to_sequence != 0 && add_extra_token_to_sequence != 1) {
    throw std::invalid_argument("build_sample_idx: add_extra_token_to_sequence must be 0 or 1");
  }
  if (sizes_any.ndim() != 1 || document_idx.ndim() != 1) {
    throw std::invalid_argument("build_sample_idx: sizes and document_idx must be 1-D");
  }
  if (!py::isinstance<py::array_t<int32_t>>(sizes_any)) {
    throw std::invalid_argument("build_sample_idx: sizes must be int32");
  }
  if (document_idx.shape(0) == 0) throw std::invalid_argument("build_sample_idx: document_idx is empty");
  const auto sizes = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(sizes_any);
  const int64_t num_samples =
      count_samples(num_epochs * tokens_per_epoch, seq_length, add_extra_token_to_sequence, drop_last_partial_sequence);
  if (py::isinstance<py::array_t<int32_t>>(document_idx)) {
    return build_sample_idx_typed<int32_t>(sizes, document_idx, seq_length, num_samples, add_extra_token_to_sequence);
  }
  if (py::isinstance<py::array_t<int64_t>>(document_idx)) {
    return build_sample_idx_typed<int64_t>(sizes, document_idx, seq_length, num_samples, add_extra_token_to_sequence);
  }
  throw std::invalid_argument("build_sample_idx: document_idx must be int32 or int64");
}

std::tuple<py::array_t<int16_t>, py::array_t<int64_t>> build_blending_indices(
    const py::array_t<double, py::array::c_style | py::array::forcecast> &weights, int64_t size) {
  if (weights.ndim() != 1 || weights.shape(0) == 0) {
    throw std::invalid_argument("build_blending_indices: weights must be a non-empty 1-D array");
  }
  const int64_t num_datasets = weights.shape(0);
  if (num_datasets > std::numeric_limits<int16_t>::max()) {
    throw std::invalid_argument("build_blending_indices: at most 32767 datasets");
  }
  if (size < 0) throw std::invalid_argument("build_blending_indices: size must be >= 0");
  const double *w = weights.data();
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  int16_t *di = dataset_index.mutable_data();
  int64_t *dsi = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> current(num_datasets, 0);
    for (int64_t i = 0; i < size; ++i) {
      // Pick the dataset furthest behind its target count w[d] * i (first one on ties).
      const double x = std::max(static_cast<double>(i), 1.0);
      int64_t best = 0;
      double best_error = w[0] * x - static_cast<double>(current[0]);
      for (int64_t d = 1; d < num_datasets; ++d) {
        const double error = w[d] * x - static_cast<double>(current[d]);
        if (error > best_error) {
          best_error = error;
          best = d;
        }
      }
      di[i] = static_cast<int16_t>(best);
      dsi[i] = current[best];
      ++current[best];
    }
  }
  return {dataset_index, dataset_sample_index};
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "C++ index builders for GPTDataset and BlendedDataset (Megatron-LM helpers.cpp semantics).";
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("document_idx"), py::arg("seq_length"),
        py::arg("num_epochs"), py::arg("tokens_per_epoch"), py::arg("drop_last_partial_sequence") = true,
        py::arg("add_extra_token_to_sequence") = 1,
        "[num_samples + 1, 2] array of (position in document_idx, offset in that document) for each sample start; "
        "int32 when every value fits, else int64.");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        "(dataset_index int16[size], dataset_sample_index int64[size]) by the greedy rule: sample i goes to the "
        "dataset maximising weights[d] * max(i, 1) - drawn[d].");
}
