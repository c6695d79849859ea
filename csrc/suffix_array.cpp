// Suffix array, LCP array and "longest repeat of an earlier position" for exact-substring dedup
// (Lee et al. 2022, "Deduplicating Training Data Makes Language Models Better"; docs/curation.md).
//
// Input: a symbol string (int32): document bytes 0..255, each document followed by a separator symbol that occurs
// nowhere else (256 + document number), so no common prefix runs across a document boundary.
//
// later_repeats returns, for every position i, length[i] = max over j < i of LCP(suffix i, suffix j) and source[i] =
// that j (-1 when length is 0). The maximum over all earlier j is attained at one of the two suffixes nearest to i in
// suffix-array order with a smaller position (LCP over a range of the suffix array is the range minimum of the LCP
// array, which only shrinks with distance), so both are found with one monotonic stack per direction: O(n) after
// the O(n log n) suffix array (prefix doubling with radix sort, Manber & Myers 1993) and the O(n) LCP (Kasai et al.
// 2001). Ties between the two candidates go to the larger LCP, then the smaller position.
//
// engine/data/curation/suffix_array.py has the NumPy implementation these must agree with exactly.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

using Index = int32_t;  // positions: inputs are chunked below 2^31 symbols

// Prefix doubling: after round k, rank[i] orders the prefixes of length 2k of suffix i (a suffix that ends sorts
// before any extension of it). Each round is two stable counting sorts (second key, then first key).
std::vector<Index> suffix_array(const int32_t* text, Index n, int32_t alphabet) {
  std::vector<Index> sa(n), rank(text, text + n), tmp(n), by_second(n);
  if (n == 0) return sa;
  std::vector<Index> count(std::max<int64_t>(alphabet, n) + 1, 0);
  for (Index i = 0; i < n; ++i) ++count[rank[i]];
  for (size_t c = 1; c < count.size(); ++c) count[c] += count[c - 1];
  for (Index i = n - 1; i >= 0; --i) sa[--count[rank[i]]] = i;
  // compress the initial ranks to 0..distinct-1 so that the equal-rank test below is meaningful
  tmp[sa[0]] = 0;
  for (Index i = 1; i < n; ++i) tmp[sa[i]] = tmp[sa[i - 1]] + (rank[sa[i]] != rank[sa[i - 1]]);
  rank.swap(tmp);
  for (Index k = 1; n > 0 && rank[sa[n - 1]] < n - 1; k <<= 1) {
    Index p = 0;
    for (Index i = n - k; i < n; ++i) by_second[p++] = i;  // no second half: smallest second key
    for (Index i = 0; i < n; ++i)
      if (sa[i] >= k) by_second[p++] = sa[i] - k;
    std::fill(count.begin(), count.end(), 0);
    for (Index i = 0; i < n; ++i) ++count[rank[i]];
    for (size_t c = 1; c < count.size(); ++c) count[c] += count[c - 1];
    for (Index i = n - 1; i >= 0; --i) sa[--count[rank[by_second[i]]]] = by_second[i];
    auto second = [&](Index i) { return i + k < n ? rank[i + k] : -1; };
    tmp[sa[0]] = 0;
    for (Index i = 1; i < n; ++i) {
      const Index a = sa[i - 1], b = sa[i];
      tmp[b] = tmp[a] + (rank[a] != rank[b] || second(a) != second(b));
    }
    rank.swap(tmp);
  }
  return sa;
}

// Kasai et al. 2001: lcp[r] = LCP(sa[r - 1], sa[r]), lcp[0] = 0; h drops by at most 1 from position i to i + 1.
std::vector<Index> lcp_array(const int32_t* text, const std::vector<Index>& sa) {
  const Index n = static_cast<Index>(sa.size());
  std::vector<Index> rank(n), lcp(n, 0);
  for (Index r = 0; r < n; ++r) rank[sa[r]] = r;
  Index h = 0;
  for (Index i = 0; i < n; ++i) {
    if (rank[i] == 0) {
      h = 0;
      continue;
    }
    const Index j = sa[rank[i] - 1];
    while (i + h < n && j + h < n && text[i + h] == text[j + h]) ++h;
    lcp[rank[i]] = h;
    if (h > 0) --h;
  }
  return lcp;
}

// For each suffix-array slot r, the nearest slot on one side (walking `order`) whose position is smaller, and the
// LCP with it: a stack of slots with increasing positions, each holding the LCP with the slot below it.
void nearest_smaller(const std::vector<Index>& sa, const std::vector<Index>& lcp, bool forward,
                     std::vector<Index>& best_len, std::vector<Index>& best_src) {
  const Index n = static_cast<Index>(sa.size());
  std::vector<std::pair<Index, Index>> stack;  // (slot, LCP with the slot below it on the stack)
  for (Index t = 0; t < n; ++t) {
    const Index r = forward ? t : n - 1 - t;
    // LCP between r and the previous slot in walking order
    Index run = t == 0 ? 0 : (forward ? lcp[r] : lcp[r + 1]);
    while (!stack.empty() && sa[stack.back().first] > sa[r]) {
      run = std::min(run, stack.back().second);
      stack.pop_back();
    }
    const Index i = sa[r];
    if (!stack.empty() && run > 0) {
      const Index j = sa[stack.back().first];
      if (run > best_len[i] || (run == best_len[i] && j < best_src[i])) {
        best_len[i] = run;
        best_src[i] = j;
      }
    }
    stack.emplace_back(r, stack.empty() ? 0 : run);
  }
}

py::tuple later_repeats(py::array_t<int32_t, py::array::c_style | py::array::forcecast> symbols, int32_t alphabet) {
  if (symbols.ndim() != 1) throw std::invalid_argument("later_repeats: symbols must be one-dimensional");
  if (symbols.shape(0) >= (int64_t{1} << 31)) throw std::invalid_argument("later_repeats: input over 2^31 symbols");
  const Index n = static_cast<Index>(symbols.shape(0));
  const int32_t* text = symbols.data();
  for (Index i = 0; i < n; ++i)
    if (text[i] < 0 || text[i] >= alphabet) throw std::invalid_argument("later_repeats: symbol outside [0, alphabet)");
  py::array_t<int32_t> length_out(n), source_out(n);
  {
    py::gil_scoped_release release;
    std::vector<Index> sa = suffix_array(text, n, alphabet);
    std::vector<Index> lcp = lcp_array(text, sa);
    std::vector<Index> best_len(n, 0), best_src(n, -1);
    nearest_smaller(sa, lcp, true, best_len, best_src);
    nearest_smaller(sa, lcp, false, best_len, best_src);
    std::copy(best_len.begin(), best_len.end(), length_out.mutable_data());
    std::copy(best_src.begin(), best_src.end(), source_out.mutable_data());
  }
  return py::make_tuple(length_out, source_out);
}

py::array_t<int32_t> suffix_array_py(py::array_t<int32_t, py::array::c_style | py::array::forcecast> symbols,
                                     int32_t alphabet) {
  const Index n = static_cast<Index>(symbols.shape(0));
  std::vector<Index> sa = suffix_array(symbols.data(), n, alphabet);
  py::array_t<int32_t> out(n);
  std::copy(sa.begin(), sa.end(), out.mutable_data());
  return out;
}

}  // namespace

PYBIND11_MODULE(_suffix_array, m) {
  m.doc() = "Suffix array, LCP and earlier-repeat lengths for exact-substring dedup (Lee et al. 2022).";
  m.def("later_repeats", &later_repeats, py::arg("symbols"), py::arg("alphabet"),
        "(length int32[n], source int32[n]): the longest common prefix of suffix i with any suffix j < i, and that j "
        "(-1 when none shares a symbol).");
  m.def("suffix_array", &suffix_array_py, py::arg("symbols"), py::arg("alphabet"),
        "The suffix array (int32) of a symbol string by prefix doubling.");
}
