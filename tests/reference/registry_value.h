#ifndef MOE_TESTS_REFERENCE_REGISTRY_VALUE_H_
#define MOE_TESTS_REFERENCE_REGISTRY_VALUE_H_

// Reads a metric from an in-process Prometheus registry (a server started in the test's process).

#include <map>
#include <string>

#include <prometheus/registry.h>

namespace moe::testing {

// The value of the first series of family `name` whose labels include `labels` (a histogram's
// sample count), or -1 when there is none.
inline double RegistryValue(prometheus::Registry& reg, const std::string& name,
                            const std::map<std::string, std::string>& labels = {}) {
  for (const auto& fam : reg.Collect()) {
    if (fam.name != name) continue;
    for (const auto& m : fam.metric) {
      bool match = true;
      for (const auto& [k, v] : labels) {
        bool found = false;
        for (const auto& l : m.label) found |= l.name == k && l.value == v;
        match &= found;
      }
      if (!match) continue;
      if (fam.type == prometheus::MetricType::Counter) return m.counter.value;
      if (fam.type == prometheus::MetricType::Gauge) return m.gauge.value;
      if (fam.type == prometheus::MetricType::Histogram) {
        return static_cast<double>(m.histogram.sample_count);
      }
    }
  }
  return -1;
}

}  // namespace moe::testing

#endif  // MOE_TESTS_REFERENCE_REGISTRY_VALUE_H_
