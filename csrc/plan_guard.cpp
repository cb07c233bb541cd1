// The guard of the CPU eval plan (fastres/models/_eval_plan.py), which must see before every forward any change
// to what its decisions rest on, in C++ because in Python it cost about 0.5 ms a forward (a tenth of a CIFAR
// ResNet's at batch 1):
//  * _tensor_state / _tensor_state_changed (ops): the state of the tensors its folded weights come from, recorded
//    once and compared per forward. Per tensor: version counter, data pointer, dtype, requires_grad, sizes,
//    strides, and the bytes of its content, whole up to `whole_elements` elements and `sampled_elements` spread
//    over a larger dense tensor (the sample fastres.nn._fused._Fingerprint takes, whose sizes the caller passes:
//    it catches edits through `.data` that bypass the version counter).
//  * module_signature (fastres._C._module_signature): per module, its class, training flag, whether it has hooks,
//    and the identity of every child, parameter and buffer, as one bytes object that compares with memcmp.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

namespace fastres {
namespace {

// How much of a tensor's content the state holds (_tensor_state's arguments, recorded at the head of meta).
struct Sampling {
  int64_t whole_elements;    // up to this many elements: all of them
  int64_t sampled_elements;  // else this many, spread over its dense memory
};

bool dense(const at::Tensor& t) {
  return t.is_contiguous() || (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
         (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d));
}

void check_tensor(const at::Tensor& t, size_t i) {
  TORCH_CHECK(t.defined() && t.device().is_cpu() && t.layout() == at::kStrided, "fastres::_tensor_state: tensors[",
              i, "] must be a defined, strided CPU tensor");
}

// An inference tensor (made under torch.inference_mode) keeps no version counter: -1, and its bytes alone show
// its in-place edits (which only inference mode allows), as fastres.nn._fused.FoldCache treats it.
int64_t version(const at::Tensor& t) {
  return t.is_inference() ? -1 : t._version();
}

// The step between t's sampled elements: 0 where every element is taken (a small or non-dense tensor, in index
// order), else s.sampled_elements elements of its dense memory at a step coprime to the element count.
int64_t sample_step(const at::Tensor& t, const Sampling& s) {
  const int64_t n = t.numel();
  if (n <= s.whole_elements || !dense(t)) {
    return 0;
  }
  int64_t step = n / s.sampled_elements;
  while (std::gcd(step, n) != 1) {
    --step;
  }
  return step;
}

// Calls visit(pointer, byte count) over t's sampled bytes, in order.
template <typename Visit>
void visit_bytes(const at::Tensor& t, const Sampling& s, Visit visit) {
  const int64_t size = t.element_size();
  const int64_t step = sample_step(t, s);
  if (step > 0) {
    const auto* base = static_cast<const uint8_t*>(t.const_data_ptr());
    for (const auto k : c10::irange(s.sampled_elements)) {
      visit(base + k * step * size, size);
    }
    return;
  }
  const at::Tensor c = t.contiguous();  // t itself where it is contiguous
  visit(static_cast<const uint8_t*>(c.const_data_ptr()), t.numel() * size);
}

void append_bytes(const at::Tensor& t, const Sampling& s, std::vector<uint8_t>& out) {
  visit_bytes(t, s, [&](const uint8_t* p, int64_t n) { out.insert(out.end(), p, p + n); });
}

// Whether t's sampled bytes are the n_bytes at b.
bool same_bytes(const at::Tensor& t, const Sampling& s, const uint8_t* b, int64_t n_bytes) {
  bool same = true;
  int64_t offset = 0;
  visit_bytes(t, s, [&](const uint8_t* p, int64_t n) {
    same = same && offset + n <= n_bytes && std::memcmp(p, b + offset, n) == 0;
    offset += n;
  });
  return same && offset == n_bytes;
}

void append_meta(const at::Tensor& t, std::vector<int64_t>& meta, int64_t bytes) {
  meta.push_back(version(t));
  meta.push_back(reinterpret_cast<int64_t>(t.const_data_ptr()));
  meta.push_back(static_cast<int64_t>(t.scalar_type()));
  meta.push_back(t.requires_grad());
  meta.push_back(t.dim());
  for (const auto s : t.sizes()) meta.push_back(s);
  for (const auto s : t.strides()) meta.push_back(s);
  meta.push_back(bytes);
}

// -> (meta: int64 [whole_elements, sampled_elements, then per tensor], bytes: uint8 [...]): what
// tensor_state_changed compares against.
std::tuple<at::Tensor, at::Tensor> tensor_state(const at::TensorList tensors, int64_t whole_elements,
                                                int64_t sampled_elements) {
  TORCH_CHECK(whole_elements >= 0 && sampled_elements > 0,
              "fastres::_tensor_state: whole_elements must be >= 0 and sampled_elements > 0, got ", whole_elements,
              " and ", sampled_elements);
  const Sampling s{whole_elements, sampled_elements};
  std::vector<int64_t> meta{whole_elements, sampled_elements};
  std::vector<uint8_t> bytes;
  for (const auto i : c10::irange(tensors.size())) {
    const at::Tensor& t = tensors[i];
    check_tensor(t, i);
    const size_t before = bytes.size();
    append_bytes(t, s, bytes);
    append_meta(t, meta, static_cast<int64_t>(bytes.size() - before));
  }
  auto meta_t = at::empty({static_cast<int64_t>(meta.size())}, at::kLong);
  std::memcpy(meta_t.data_ptr<int64_t>(), meta.data(), meta.size() * sizeof(int64_t));
  auto bytes_t = at::empty({static_cast<int64_t>(bytes.size())}, at::kByte);
  if (!bytes.empty()) {
    std::memcpy(bytes_t.data_ptr<uint8_t>(), bytes.data(), bytes.size());
  }
  return {meta_t, bytes_t};
}

// Whether any of `tensors` differs from the (meta, bytes) tensor_state recorded for the same list, or (with
// grad_enabled) requires a gradient.
bool tensor_state_changed(const at::TensorList tensors, const at::Tensor& meta, const at::Tensor& bytes,
                          bool grad_enabled) {
  TORCH_CHECK(meta.scalar_type() == at::kLong && meta.is_contiguous() && bytes.scalar_type() == at::kByte &&
                  bytes.is_contiguous(),
              "fastres::_tensor_state_changed: meta and bytes must be what _tensor_state returned");
  TORCH_CHECK(meta.numel() >= 2, "fastres::_tensor_state_changed: meta must be what _tensor_state returned");
  const int64_t* m = meta.const_data_ptr<int64_t>();
  const int64_t* m_end = m + meta.numel();
  const Sampling s{m[0], m[1]};
  m += 2;
  const uint8_t* b = bytes.const_data_ptr<uint8_t>();
  const uint8_t* b_end = b + bytes.numel();
  for (const auto i : c10::irange(tensors.size())) {
    const at::Tensor& t = tensors[i];
    check_tensor(t, i);
    if (m + 5 > m_end || m[0] != version(t) || m[1] != reinterpret_cast<int64_t>(t.const_data_ptr()) ||
        m[2] != static_cast<int64_t>(t.scalar_type()) || m[3] != t.requires_grad() || m[4] != t.dim()) {
      return true;
    }
    if (grad_enabled && t.requires_grad()) {
      return true;
    }
    const int64_t dim = m[4];
    m += 5;
    if (m + 2 * dim + 1 > m_end || !std::equal(m, m + dim, t.sizes().begin()) ||
        !std::equal(m + dim, m + 2 * dim, t.strides().begin())) {
      return true;
    }
    m += 2 * dim;
    const int64_t n_bytes = *m++;
    if (b + n_bytes > b_end || !same_bytes(t, s, b, n_bytes)) {
      return true;
    }
    b += n_bytes;
  }
  return m != m_end || b != b_end;  // another list than the one recorded
}

// ---- modules ------------------------------------------------------------------------------------------------
void put(std::string& out, uintptr_t value) {
  out.append(reinterpret_cast<const char*>(&value), sizeof value);
}

// Appends m's signature to out; false with a Python error set where an attribute is missing or not a dict.
bool append_module(PyObject* m, std::string& out) {
  static PyObject* const training = PyUnicode_InternFromString("training");
  static PyObject* const hooks[] = {PyUnicode_InternFromString("_forward_hooks"),
                                    PyUnicode_InternFromString("_forward_pre_hooks"),
                                    PyUnicode_InternFromString("_backward_hooks"),
                                    PyUnicode_InternFromString("_backward_pre_hooks")};
  static PyObject* const members[] = {PyUnicode_InternFromString("_modules"),
                                      PyUnicode_InternFromString("_parameters"),
                                      PyUnicode_InternFromString("_buffers")};
  put(out, reinterpret_cast<uintptr_t>(Py_TYPE(m)));
  PyObject* flag = PyObject_GetAttr(m, training);
  if (flag == nullptr) {
    return false;
  }
  const int is_training = PyObject_IsTrue(flag);
  Py_DECREF(flag);
  if (is_training < 0) {
    return false;
  }
  put(out, static_cast<uintptr_t>(is_training));
  uintptr_t hooked = 0;
  for (PyObject* name : hooks) {
    PyObject* d = PyObject_GetAttr(m, name);
    if (d == nullptr) {
      return false;
    }
    const Py_ssize_t n = PyObject_Length(d);
    Py_DECREF(d);
    if (n < 0) {
      return false;
    }
    hooked |= n > 0;
  }
  put(out, hooked);
  for (PyObject* name : members) {
    PyObject* d = PyObject_GetAttr(m, name);
    if (d == nullptr) {
      return false;
    }
    if (!PyDict_Check(d)) {
      Py_DECREF(d);
      PyErr_Format(PyExc_TypeError, "fastres._C._module_signature: a module's %U is not a dict", name);
      return false;
    }
    put(out, static_cast<uintptr_t>(PyDict_Size(d)));
    Py_ssize_t pos = 0;
    PyObject* key = nullptr;
    PyObject* value = nullptr;
    while (PyDict_Next(d, &pos, &key, &value)) {
      put(out, reinterpret_cast<uintptr_t>(value));  // identity, as Python's id()
    }
    Py_DECREF(d);
  }
  return true;
}

}  // namespace

// _module_signature(root, modules: tuple) -> bytes: the signature of root then of each module, in order.
PyObject* module_signature(PyObject* /*self*/, PyObject* args) {
  PyObject* root = nullptr;
  PyObject* modules = nullptr;
  if (!PyArg_ParseTuple(args, "OO!:_module_signature", &root, &PyTuple_Type, &modules)) {
    return nullptr;
  }
  std::string out;
  if (!append_module(root, out)) {
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(modules); ++i) {
    if (!append_module(PyTuple_GET_ITEM(modules, i), out)) {
      return nullptr;
    }
  }
  return PyBytes_FromStringAndSize(out.data(), static_cast<Py_ssize_t>(out.size()));
}

}  // namespace fastres

TORCH_LIBRARY_FRAGMENT(fastres, m) {
  m.def("_tensor_state(Tensor[] tensors, int whole_elements, int sampled_elements) -> (Tensor meta, Tensor bytes)");
  m.def("_tensor_state_changed(Tensor[] tensors, Tensor meta, Tensor bytes, bool grad_enabled) -> bool");
}

// Composite: they only read metadata and bytes, under any autograd or inference mode, for any dispatch key set
// of CPU tensors (the plan never runs them under a trace).
TORCH_LIBRARY_IMPL(fastres, CompositeImplicitAutograd, m) {
  m.impl("_tensor_state", &fastres::tensor_state);
  m.impl("_tensor_state_changed", &fastres::tensor_state_changed);
}
