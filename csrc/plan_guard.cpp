// The guard of the CPU eval plan (fastres/models/_eval_plan.py), which must see before every forward any change
// to what its decisions rest on, in C++ because in Python it cost about 0.5 ms a forward (a tenth of a CIFAR
// ResNet's at batch 1):
//  * _tensor_state_guard (fastres._C): the state of the tensors its folded weights come from, recorded once into a
//    guard that holds them. Per tensor: version counter, data pointer, dtype, requires_grad, sizes, strides, and the
//    bytes of its content, whole up to `whole_elements` elements and `sampled_elements` spread over a larger dense
//    tensor (the sample fastres.nn._fused._Fingerprint takes, whose sizes the caller passes: it catches edits
//    through `.data` that bypass the version counter).
//  * _module_signature (fastres._C): per module, its class, training flag, whether it has hooks, and the identity of
//    every child, parameter and buffer, as one bytes object that compares with memcmp.
//  * _plan_changed (fastres._C), before every forward: the signature against the recorded one, the attributes the
//    plan's units were built from (conv geometry, eps, pool arguments...) against the values recorded then, and the
//    tensors against their guard; the modules on the caller's thread while ATen's other intra-op threads check the
//    tensors.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

namespace fastres {
namespace {

// How much of a tensor's content the state holds (_tensor_state_guard's arguments).
struct Sampling {
  int64_t whole_elements;    // up to this many elements: all of them
  int64_t sampled_elements;  // else this many, spread over its dense memory
};

bool dense(const at::Tensor& t) {
  return t.is_contiguous() || (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
         (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d));
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

// Whether the n elements of type T at base, base + step, ... are the n at b: one load per element and no branch
// between them, so that the sampled elements (each in another page of a large weight, evicted by the forward since
// the last check) are fetched in parallel rather than one cache miss after another.
template <typename T>
bool same_strided(const uint8_t* base, int64_t step, int64_t n, const uint8_t* b) {
  T diff = 0;
  for (int64_t k = 0; k < n; ++k) {
    T value;
    T expected;
    std::memcpy(&value, base + k * step * static_cast<int64_t>(sizeof(T)), sizeof(T));
    std::memcpy(&expected, b + k * static_cast<int64_t>(sizeof(T)), sizeof(T));
    diff |= value ^ expected;
  }
  return diff == 0;
}

// What the guard recorded of one tensor.
struct Record {
  int64_t version;
  const void* data;
  at::ScalarType dtype;
  bool requires_grad;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  int64_t step;     // sample_step at recording: 0, the whole tensor
  size_t offset;    // of its bytes in TensorStateGuard::bytes
  size_t n_bytes;
};

// The state of a list of CPU tensors, and the tensors (and their storages, so that an unchanged data pointer means
// the same memory, never a new allocation at a freed address). Held by a capsule (_tensor_state_guard).
class TensorStateGuard {
 public:
  TensorStateGuard(std::vector<at::Tensor> tensors, Sampling s) : tensors_(std::move(tensors)), sampling_(s) {
    for (const auto& t : tensors_) {
      storages_.push_back(t.storage());
      const int64_t step = sample_step(t, sampling_);
      Record r{version(t), t.const_data_ptr(), t.scalar_type(), t.requires_grad(), t.sizes().vec(),
               t.strides().vec(), step, bytes_.size(), 0};
      const auto* base = static_cast<const uint8_t*>(t.const_data_ptr());
      const int64_t size = t.element_size();
      if (step > 0) {
        for (const auto k : c10::irange(sampling_.sampled_elements)) {
          bytes_.insert(bytes_.end(), base + k * step * size, base + (k * step + 1) * size);
        }
      } else {
        const at::Tensor c = t.contiguous();  // t itself where it is contiguous
        const auto* p = static_cast<const uint8_t*>(c.const_data_ptr());
        bytes_.insert(bytes_.end(), p, p + t.numel() * size);
      }
      r.n_bytes = bytes_.size() - r.offset;
      records_.push_back(std::move(r));
    }
  }

  // One thread's part of the check whether any tensor differs from what was recorded, or (with grad_enabled)
  // requires a gradient, shared out to ATen's intra-op threads: the check is bound by its cache misses (after a
  // forward, the sampled elements are in DRAM), and each core brings its own misses in flight (measured with the
  // tensors split evenly against one thread, 0.1 s of idle before each forward, ad hoc, Intel Xeon, 2 threads: a
  // CIFAR ResNet-56 forward at batch 1 1.026x faster [95% CI 1.008, 1.049], ResNet-50's 1.004x [0.993, 1.012]).
  // It takes kChunk tensors at a time from `next` until there are none left or `seen` is set (a change, by any
  // thread); it sets `seen` on a change of its own.
  void check(std::atomic<int64_t>& next, std::atomic<bool>& seen, bool grad_enabled) const {
    const auto n = static_cast<int64_t>(tensors_.size());
    for (int64_t begin = next.fetch_add(kChunk); begin < n && !seen.load(std::memory_order_relaxed);
         begin = next.fetch_add(kChunk)) {
      const int64_t end = std::min(begin + kChunk, n);
      prefetch(begin, end);
      for (int64_t i = begin; i < end; ++i) {
        if (changed(tensors_[i], records_[i], grad_enabled)) {
          seen.store(true, std::memory_order_relaxed);
          return;
        }
      }
    }
  }

 private:
  // Tensors a thread takes at once: their sampled elements (up to 256 each) requested together.
  static constexpr int64_t kChunk = 8;

  // The tensors and the bytes compared are cold after a forward (the forward reads the packed weights, not
  // these): their first cache lines, and every sampled element, are requested at once from the recorded pointers
  // (a stale pointer is harmless: a prefetch never faults), so that the misses overlap instead of queueing.
  void prefetch(int64_t begin, int64_t end) const {
    for (int64_t i = begin; i < end; ++i) {
      __builtin_prefetch(tensors_[i].unsafeGetTensorImpl());
    }
    for (int64_t i = begin; i < end; ++i) {
      const Record& r = records_[i];
      const auto* base = static_cast<const uint8_t*>(r.data);
      if (r.step == 0) {
        __builtin_prefetch(base);
        continue;
      }
      const int64_t size = at::elementSize(r.dtype);
      for (const auto k : c10::irange(sampling_.sampled_elements)) {
        __builtin_prefetch(base + k * r.step * size);
      }
    }
  }

  bool changed(const at::Tensor& t, const Record& r, bool grad_enabled) const {
    if (r.version != version(t) || r.data != t.const_data_ptr() || r.dtype != t.scalar_type() ||
        r.requires_grad != t.requires_grad() || (grad_enabled && t.requires_grad()) || t.sizes() != r.sizes ||
        t.strides() != r.strides) {
      return true;
    }
    const uint8_t* b = bytes_.data() + r.offset;
    const auto* base = static_cast<const uint8_t*>(t.const_data_ptr());
    if (r.step > 0) {
      switch (t.element_size()) {
        case 1: return !same_strided<uint8_t>(base, r.step, sampling_.sampled_elements, b);
        case 2: return !same_strided<uint16_t>(base, r.step, sampling_.sampled_elements, b);
        case 4: return !same_strided<uint32_t>(base, r.step, sampling_.sampled_elements, b);
        case 8: return !same_strided<uint64_t>(base, r.step, sampling_.sampled_elements, b);
        default:
          break;
      }
      const int64_t size = t.element_size();
      for (const auto k : c10::irange(sampling_.sampled_elements)) {
        if (std::memcmp(base + k * r.step * size, b + k * size, size) != 0) {
          return true;
        }
      }
      return false;
    }
    const at::Tensor c = t.contiguous();
    return std::memcmp(c.const_data_ptr(), b, r.n_bytes) != 0;
  }

  std::vector<at::Tensor> tensors_;
  std::vector<c10::Storage> storages_;
  Sampling sampling_;
  std::vector<Record> records_;
  std::vector<uint8_t> bytes_;
};

constexpr const char* kGuardCapsule = "fastres._C.TensorStateGuard";

void delete_guard(PyObject* capsule) {
  delete static_cast<TensorStateGuard*>(PyCapsule_GetPointer(capsule, kGuardCapsule));
}

// ---- modules ------------------------------------------------------------------------------------------------
void put(std::string& out, uintptr_t value) {
  out.append(reinterpret_cast<const char*>(&value), sizeof value);
}

// m's __dict__ (a new reference) where getattr reads m's attributes from it (no __getattribute__ of its own type),
// else nullptr.
PyObject* plain_instance_dict(PyObject* m) {
#if PY_VERSION_HEX >= 0x030D0000
  (void)m;  // (from 3.13 on, _PyObject_GetDictPtr may build an inline-values dict: getattr there)
  return nullptr;
#else
  static PyObject* const getattribute = PyUnicode_InternFromString("__getattribute__");
  static PyObject* const object_getattribute = _PyType_Lookup(&PyBaseObject_Type, getattribute);
  PyObject** dict = _PyObject_GetDictPtr(m);
  if (dict == nullptr || *dict == nullptr || _PyType_Lookup(Py_TYPE(m), getattribute) != object_getattribute) {
    return nullptr;
  }
  Py_INCREF(*dict);
  return *dict;
#endif
}

// Releases a reference when it goes out of scope.
struct OwnedRef {
  PyObject* object;
  ~OwnedRef() { Py_XDECREF(object); }
};

// getattr(m, name) as a new reference, read from dict (plain_instance_dict(m)) where getattr would find it there (no
// data descriptor of that name on m's type): a third off the signature's cost (eight attributes of each of a ResNet's
// 150-170 modules before every forward), the same result. The attribute checks read theirs the same way.
PyObject* module_attribute(PyObject* m, PyObject* dict, PyObject* name) {
  if (dict != nullptr) {
    PyObject* descriptor = _PyType_Lookup(Py_TYPE(m), name);
    if (descriptor == nullptr || Py_TYPE(descriptor)->tp_descr_set == nullptr) {
      PyObject* value = PyDict_GetItemWithError(dict, name);
      if (value != nullptr) {
        Py_INCREF(value);
        return value;
      }
      if (PyErr_Occurred()) {
        return nullptr;
      }
    }
  }
  return PyObject_GetAttr(m, name);
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
  const OwnedRef owned_dict{plain_instance_dict(m)};
  PyObject* const dict = owned_dict.object;
  PyObject* flag = module_attribute(m, dict, training);
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
    PyObject* d = module_attribute(m, dict, name);
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
    PyObject* d = module_attribute(m, dict, name);
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

// The signature of root then of each module of `modules` (a tuple), in order, appended to out; false with a Python
// error set.
bool signature(PyObject* root, PyObject* modules, std::string& out) {
  if (!append_module(root, out)) {
    return false;
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(modules); ++i) {
    if (!append_module(PyTuple_GET_ITEM(modules, i), out)) {
      return false;
    }
  }
  return true;
}

// Whether, for any (obj, name, recorded) of `entries` (a tuple), getattr(obj, name) now is neither `recorded`
// itself nor a value of the same type equal to it (or is gone): 1, else 0; -1 with a Python error set.
int attributes_differ(PyObject* entries) {
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(entries); ++i) {
    PyObject* entry = PyTuple_GET_ITEM(entries, i);
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 3 || !PyUnicode_Check(PyTuple_GET_ITEM(entry, 1))) {
      PyErr_Format(PyExc_TypeError, "fastres._C._plan_changed: entries[%zd] must be (obj, name: str, value)", i);
      return -1;
    }
    PyObject* recorded = PyTuple_GET_ITEM(entry, 2);
    PyObject* obj = PyTuple_GET_ITEM(entry, 0);
    const OwnedRef dict{plain_instance_dict(obj)};
    PyObject* now = module_attribute(obj, dict.object, PyTuple_GET_ITEM(entry, 1));
    if (now == nullptr) {
      if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
        return -1;
      }
      PyErr_Clear();  // an attribute deleted: changed
      return 1;
    }
    int same = now == recorded;
    if (!same && Py_TYPE(now) == Py_TYPE(recorded)) {
      same = PyObject_RichCompareBool(now, recorded, Py_EQ);
    }
    Py_DECREF(now);
    if (same < 0) {
      return -1;
    }
    if (!same) {
      return 1;
    }
  }
  return 0;
}

// The modules' signature against `recorded` (bytes), then the attributes: 1 where either changed, else 0; -1 with
// a Python error set.
int modules_differ(PyObject* root, PyObject* modules, PyObject* recorded, PyObject* entries) {
  std::string now;
  if (!signature(root, modules, now)) {
    return -1;
  }
  if (static_cast<size_t>(PyBytes_GET_SIZE(recorded)) != now.size() ||
      std::memcmp(PyBytes_AS_STRING(recorded), now.data(), now.size()) != 0) {
    return 1;
  }
  return attributes_differ(entries);
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
  if (!signature(root, modules, out)) {
    return nullptr;
  }
  return PyBytes_FromStringAndSize(out.data(), static_cast<Py_ssize_t>(out.size()));
}

// _tensor_state_guard(tensors: list or tuple, whole_elements: int, sampled_elements: int) -> capsule: the state of
// `tensors` now, for _plan_changed; the capsule holds the tensors.
PyObject* tensor_state_guard(PyObject* /*self*/, PyObject* args) {
  PyObject* sequence = nullptr;
  long long whole_elements = 0;
  long long sampled_elements = 0;
  if (!PyArg_ParseTuple(args, "OLL:_tensor_state_guard", &sequence, &whole_elements, &sampled_elements)) {
    return nullptr;
  }
  if (whole_elements < 0 || sampled_elements <= 0) {
    PyErr_Format(PyExc_ValueError,
                 "fastres._C._tensor_state_guard: whole_elements must be >= 0 and sampled_elements > 0, got %lld "
                 "and %lld", whole_elements, sampled_elements);
    return nullptr;
  }
  PyObject* items = PySequence_Fast(sequence, "fastres._C._tensor_state_guard: tensors must be a list or tuple");
  if (items == nullptr) {
    return nullptr;
  }
  std::vector<at::Tensor> tensors;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(items); ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(items, i);
    const bool ok = THPVariable_Check(item);
    at::Tensor t = ok ? THPVariable_Unpack(item) : at::Tensor();
    if (!ok || !t.defined() || !t.device().is_cpu() || t.layout() != at::kStrided) {
      Py_DECREF(items);
      PyErr_Format(PyExc_TypeError, "fastres._C._tensor_state_guard: tensors[%zd] must be a strided CPU tensor", i);
      return nullptr;
    }
    tensors.push_back(std::move(t));
  }
  Py_DECREF(items);
  TensorStateGuard* guard = nullptr;
  try {
    guard = new TensorStateGuard(std::move(tensors), Sampling{whole_elements, sampled_elements});
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  PyObject* capsule = PyCapsule_New(guard, kGuardCapsule, delete_guard);
  if (capsule == nullptr) {
    delete guard;
  }
  return capsule;
}

// _plan_changed(root, modules: tuple, signature: bytes, entries: tuple, guard, grad_enabled: bool) -> bool: whether
// _module_signature(root, modules) differs from `signature`, or an attribute of `entries` (obj, name, recorded)
// changed (attributes_differ), or a tensor of `guard` (_tensor_state_guard) changed or, with grad_enabled, requires
// a gradient (TensorStateGuard::check): the whole guard of the plan, before every forward. The caller's
// thread (which holds the GIL) checks the modules and attributes while ATen's other intra-op threads check the
// tensors, and then joins them: the two parts are bound by cache misses on different objects, so they overlap.
// Only the caller's thread touches Python objects; the others read the tensors the guard holds (a thread that
// mutates them during a forward races with that forward anyway).
PyObject* plan_changed(PyObject* /*self*/, PyObject* args) {
  PyObject* root = nullptr;
  PyObject* modules = nullptr;
  PyObject* recorded = nullptr;
  PyObject* entries = nullptr;
  PyObject* capsule = nullptr;
  int grad_enabled = 0;
  if (!PyArg_ParseTuple(args, "OO!O!O!Op:_plan_changed", &root, &PyTuple_Type, &modules, &PyBytes_Type, &recorded,
                        &PyTuple_Type, &entries, &capsule, &grad_enabled)) {
    return nullptr;
  }
  if (!PyCapsule_IsValid(capsule, kGuardCapsule)) {
    PyErr_SetString(PyExc_TypeError, "fastres._C._plan_changed: guard must be what _tensor_state_guard returned");
    return nullptr;
  }
  const auto* guard = static_cast<const TensorStateGuard*>(PyCapsule_GetPointer(capsule, kGuardCapsule));
  const std::thread::id caller = std::this_thread::get_id();
  std::atomic<int64_t> next{0};
  std::atomic<bool> seen{false};
  bool modules_checked = false;  // (written by the caller's thread only)
  int modules_result = 0;
  auto check_modules = [&] {
    modules_checked = true;
    modules_result = modules_differ(root, modules, recorded, entries);
    if (modules_result != 0) {
      seen.store(true);  // changed, or an error: the tensors need no more checking
    }
  };
  try {
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      if (std::this_thread::get_id() == caller && !modules_checked) {
        check_modules();
      }
      guard->check(next, seen, grad_enabled != 0);
    });
  } catch (const std::exception& e) {
    if (!PyErr_Occurred()) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
    return nullptr;
  }
  if (!modules_checked && !seen.load()) {  // none of the region's threads was the caller's (a backend that runs
    check_modules();                        // every part on its pool): the modules after the tensors
  }
  if (modules_result < 0) {
    return nullptr;
  }
  return PyBool_FromLong(modules_result != 0 || seen.load());
}

}  // namespace fastres
