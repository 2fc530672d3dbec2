// Errors inside the library: an exception carrying a ta_status, turned into a status and a
// thread-local message at the C API boundary (guard). Nothing throws across the C API.
#pragma once

#include <new>
#include <type_traits>
#include <stdexcept>
#include <string>
#include <utility>

#include "turboattn/turboattn.h"

namespace turboattn {

class Error : public std::runtime_error {
 public:
  Error(ta_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  ta_status status() const { return status_; }

 private:
  ta_status status_;
};

// Joins message parts. Numbers go through std::to_string (C formatting), not iostreams: a process that
// loaded another libstdc++ first (as PyTorch's can) may not format through this one's locale facets.
inline void append_part(std::string& s, const std::string& part) { s += part; }
inline void append_part(std::string& s, const char* part) { s += part; }
inline void append_part(std::string& s, char part) { s += part; }
template <class T, class = std::enable_if_t<std::is_arithmetic_v<T>>>
void append_part(std::string& s, T part) {
  s += std::to_string(part);
}

template <class... Parts>
std::string concat(Parts&&... parts) {
  std::string s;
  (append_part(s, std::forward<Parts>(parts)), ...);
  return s;
}

// Throws Error(status, message) unless cond holds.
template <class... Parts>
void require(bool cond, ta_status status, Parts&&... parts) {
  if (!cond) throw Error(status, concat(std::forward<Parts>(parts)...));
}

void set_last_error(const std::string& message);

// Runs fn, mapping exceptions to a status and the thread's last error message.
template <class Fn>
ta_status guard(Fn&& fn) {
  try {
    fn();
    set_last_error("");
    return TA_SUCCESS;
  } catch (const Error& e) {
    set_last_error(e.what());
    return e.status();
  } catch (const std::bad_alloc&) {
    set_last_error("out of host memory");
    return TA_ERROR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    set_last_error(concat("internal error: ", e.what()));
    return TA_ERROR_INTERNAL;
  }
}

}  // namespace turboattn
