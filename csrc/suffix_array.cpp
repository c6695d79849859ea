// Suffix array, LCP array and "longest repeat of an earlier position" for exact-substring dedup
// (Lee et al. 2022, "Deduplicating Training Data Makes Language Models Better"; docs/curation.md).
//
// Input: a symbol string (int32): document bytes 0..255, each document followed by a separator symbol that occurs
// nowhere else (256 + document number), so no common prefix runs across a document boundary.
//
// later_repeats returns, for every position i, length[i] = max over j < i of LCP(suffix i, suffix j) and source[i] =
// that j (-1 when length is 0). The maximum over all earlier j is attained at one of the two suffixes nearest to i in
// suffix-array order with a smaller position (LCP over a range of the suffix array is the range minimum of the LCP
// array, which only shrinks with distance), so both are found with one monotonic stack per direction. All three
// passes are O(n): the suffix array by SA-IS (Nong, Zhang & Chan 2009; prefix doubling with radix sort below 40
// symbols), the LCP by Kasai et al. 2001. Ties between the two candidates go to the larger LCP, then the smaller
// position.
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
std::vector<Index> suffix_array_doubling(const int32_t* text, Index n, int32_t alphabet) {
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

// SA-IS (Nong, Zhang & Chan 2009), linear time: sort the LMS substrings by induced sorting, name them, sort the
// reduced string recursively, then induce the whole order from the sorted LMS suffixes. Follows the AtCoder Library's
// formulation; short strings use prefix doubling. Symbols are in [0, upper].
std::vector<Index> suffix_array_sais(const Index* s, Index n, Index upper) {
  if (n < 40) return suffix_array_doubling(s, n, upper + 1);
  std::vector<Index> sa(n);
  std::vector<bool> is_s(n, false);  // S-type: suffix i < suffix i + 1
  for (Index i = n - 2; i >= 0; --i) is_s[i] = s[i] == s[i + 1] ? is_s[i + 1] : s[i] < s[i + 1];
  std::vector<Index> sum_l(upper + 2, 0), sum_s(upper + 2, 0);  // bucket starts of the L and S parts
  for (Index i = 0; i < n; ++i) {
    if (!is_s[i])
      ++sum_s[s[i]];
    else
      ++sum_l[s[i] + 1];
  }
  for (Index c = 0; c <= upper; ++c) {
    sum_s[c] += sum_l[c];
    if (c < upper) sum_l[c + 1] += sum_s[c];
  }
  std::vector<Index> bucket(upper + 2);
  auto induce = [&](const std::vector<Index>& lms) {
    std::fill(sa.begin(), sa.end(), -1);
    std::copy(sum_s.begin(), sum_s.end(), bucket.begin());
    for (Index d : lms)
      if (d != n) sa[bucket[s[d]]++] = d;
    std::copy(sum_l.begin(), sum_l.end(), bucket.begin());
    sa[bucket[s[n - 1]]++] = n - 1;
    for (Index i = 0; i < n; ++i) {
      const Index v = sa[i];
      if (v >= 1 && !is_s[v - 1]) sa[bucket[s[v - 1]]++] = v - 1;
    }
    std::copy(sum_l.begin(), sum_l.end(), bucket.begin());
    for (Index i = n - 1; i >= 0; --i) {
      const Index v = sa[i];
      if (v >= 1 && is_s[v - 1]) sa[--bucket[s[v - 1] + 1]] = v - 1;
    }
  };
  std::vector<Index> lms_map(n + 1, -1), lms;
  Index m = 0;
  for (Index i = 1; i < n; ++i)
    if (!is_s[i - 1] && is_s[i]) lms_map[i] = m++;
  lms.reserve(m);
  for (Index i = 1; i < n; ++i)
    if (!is_s[i - 1] && is_s[i]) lms.push_back(i);
  induce(lms);
  if (m) {
    std::vector<Index> sorted_lms;
    sorted_lms.reserve(m);
    for (Index v : sa)
      if (lms_map[v] != -1) sorted_lms.push_back(v);
    std::vector<Index> reduced(m);
    Index names = 0;
    reduced[lms_map[sorted_lms[0]]] = 0;
    for (Index k = 1; k < m; ++k) {
      Index l = sorted_lms[k - 1], r = sorted_lms[k];
      const Index end_l = lms_map[l] + 1 < m ? lms[lms_map[l] + 1] : n;
      const Index end_r = lms_map[r] + 1 < m ? lms[lms_map[r] + 1] : n;
      bool same = end_l - l == end_r - r;
      if (same) {
        while (l < end_l && s[l] == s[r]) ++l, ++r;
        if (l == n || s[l] != s[r]) same = false;
      }
      if (!same) ++names;
      reduced[lms_map[sorted_lms[k]]] = names;
    }
    lms_map = std::vector<Index>();  // free before recursing
    const std::vector<Index> reduced_sa = suffix_array_sais(reduced.data(), m, names);
    for (Index k = 0; k < m; ++k) sorted_lms[k] = lms[reduced_sa[k]];
    induce(sorted_lms);
  }
  return sa;
}

std::vector<Index> suffix_array(const int32_t* text, Index n, int32_t alphabet) {
  return suffix_array_sais(text, n, alphabet - 1);
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
void nearest_smaller(const std::vector<Index>& sa, const std::vector<Index>& lcp, bool forward, Index* best_len,
                     Index* best_src) {
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
  Index* length = length_out.mutable_data();
  Index* source = source_out.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<Index> sa = suffix_array(text, n, alphabet);
    std::vector<Index> lcp = lcp_array(text, sa);
    std::fill(length, length + n, 0);
    std::fill(source, source + n, -1);
    nearest_smaller(sa, lcp, true, length, source);
    nearest_smaller(sa, lcp, false, length, source);
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
        "The suffix array (int32) of a symbol string (SA-IS).");
}
