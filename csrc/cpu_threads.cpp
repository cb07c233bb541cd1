// _pin_intraop_workers (fastres._C): ATen's intra-op worker threads, each pinned to one CPU, for the CPU eval plan
// (fastres/models/_threads.py says why and when). The caller's thread is never pinned.
#include <Python.h>

#include <ATen/Config.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <exception>
#include <vector>

#ifdef __linux__
#include <pthread.h>
#include <sched.h>
#endif

namespace fastres {

// _pin_intraop_workers(cpus: tuple of int) -> int: with as many CPUs as ATen's intra-op threads, pins team thread t
// (t >= 1) to cpus[t], from inside a parallel region of that team size: a parallel_for over [0, threads) with
// grain 1 runs index t on team thread t (as fe_invalid_clear relies on, csrc/cpu_plan.cpp). Returns how many threads
// it pinned: 0 where ATen's backend is not OpenMP, off Linux, or where the region ran on the caller's thread alone
// (called inside another parallel region).
PyObject* pin_intraop_workers(PyObject* /*self*/, PyObject* args) {
  PyObject* tuple = nullptr;
  if (!PyArg_ParseTuple(args, "O!:_pin_intraop_workers", &PyTuple_Type, &tuple)) {
    return nullptr;
  }
  const Py_ssize_t n = PyTuple_GET_SIZE(tuple);
  std::vector<int> cpus;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const long cpu = PyLong_AsLong(PyTuple_GET_ITEM(tuple, i));
    if (cpu == -1 && PyErr_Occurred()) {
      return nullptr;
    }
#ifdef __linux__
    if (cpu < 0 || cpu >= CPU_SETSIZE) {
      PyErr_Format(PyExc_ValueError, "fastres._C._pin_intraop_workers: cpus[%zd] = %ld is not a CPU number", i, cpu);
      return nullptr;
    }
#endif
    cpus.push_back(static_cast<int>(cpu));
  }
  if (n != at::get_num_threads()) {
    PyErr_Format(PyExc_ValueError,
                 "fastres._C._pin_intraop_workers: cpus must name one CPU per intra-op thread (%d), got %zd",
                 at::get_num_threads(), n);
    return nullptr;
  }
#if defined(__linux__) && AT_PARALLEL_OPENMP
  std::atomic<int> pinned{0};
  std::atomic<int> error{0};
  const pthread_t caller = pthread_self();
  try {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        if (t == 0 || pthread_equal(pthread_self(), caller)) {
          continue;
        }
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpus[t], &set);
        if (sched_setaffinity(0, sizeof set, &set) == 0) {  // (0: the calling thread)
          pinned.fetch_add(1);
        } else {
          error.store(errno);
        }
      }
    });
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  if (error.load() != 0) {
    PyErr_Format(PyExc_OSError, "fastres._C._pin_intraop_workers: sched_setaffinity failed: %s",
                 std::strerror(error.load()));
    return nullptr;
  }
  return PyLong_FromLong(pinned.load());
#else
  return PyLong_FromLong(0);
#endif
}

}  // namespace fastres
