// Console reporter that also prints a short table at the end (--summary), and the main() both
// benchmark binaries share. The JSON file reporter (--benchmark_out=...) is unaffected: Google
// Benchmark creates it itself next to whichever display reporter we pass.
#pragma once

#include <benchmark/benchmark.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

namespace kvattn_bench {

class SummaryReporter : public benchmark::ConsoleReporter {
 public:
  // Tabular counters read best here (every run of a binary has the same counters); colour only on a tty.
  SummaryReporter() : ConsoleReporter(isatty(STDOUT_FILENO) ? OO_ColorTabular : OO_Tabular) {}

  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& r : runs) {
      // One row per benchmark: the run itself, or the median when there are repetitions.
      const bool single = r.run_type == Run::RT_Iteration && r.repetitions <= 1;
      const bool median = r.run_type == Run::RT_Aggregate && r.aggregate_name == "median";
      if (single || median || (r.error_occurred && r.repetition_index <= 0)) rows_.push_back(r);
    }
  }

  void Finalize() override {
    ConsoleReporter::Finalize();
    std::size_t width = 4;
    for (const Run& r : rows_) width = std::max(width, r.benchmark_name().size());
    // Columns only some benchmarks report, shown when a row has them: compute_ratio and
    // fma_fraction (Overlap) and fma_over_stream (decode: FMA floor / stream floor, above 1 where
    // the step is compute-bound).
    struct Optional {
      const char* counter;
      const char* title;
    };
    std::vector<Optional> extra;
    for (const Optional o : {Optional{"compute_ratio", "compute_ratio"}, Optional{"fma_fraction", "fma_fraction"},
                              Optional{"fma_over_stream", "fma/stream"}})
      if (std::any_of(rows_.begin(), rows_.end(), [&](const Run& r) { return r.counters.count(o.counter) > 0; })) extra.push_back(o);
    std::string out = "\nSummary\n";
    char header[64];
    std::snprintf(header, sizeof header, "  %11s  %11s  %9s  %11s", "bytes/token", "time", "GB/s", "floor_ratio");
    std::string titles = header;
    for (const Optional& o : extra) {
      std::snprintf(header, sizeof header, "  %13s", o.title);
      titles += header;
    }
    out += pad("name", width) + titles + "\n" + std::string(width + titles.size(), '-') + "\n";
    for (const Run& r : rows_) {
      out += pad(r.benchmark_name(), width);
      if (r.error_occurred) {
        out += "  skipped: " + r.error_message + "\n";
        continue;
      }
      // The median step where a benchmark reports it (decode: its floor_ratio is a ratio of medians).
      const auto median = r.counters.find("median_us");
      const double seconds = median != r.counters.end() ? median->second.value * 1e-6
                                                        : r.GetAdjustedRealTime() / benchmark::GetTimeUnitMultiplier(r.time_unit);
      out += "  " + counter(r, "bytes_per_token", 11, 0) + "  " + format_time(seconds) + "  " +
             counter(r, "GB_per_s", 9, 2) + "  " + counter(r, "floor_ratio", 11, 2);
      for (const Optional& o : extra) out += "  " + counter(r, o.counter, 13, 2);
      out += "\n";
    }
    GetOutputStream() << out << std::flush;
  }

 private:
  static std::string pad(std::string s, std::size_t width) { return s.append(width - std::min(width, s.size()), ' '); }

  // A counter as "%width.prec f", or "-" when this benchmark does not report it.
  static std::string counter(const Run& r, const char* name, int width, int prec) {
    const auto it = r.counters.find(name);
    char buf[48];
    if (it == r.counters.end())
      std::snprintf(buf, sizeof buf, "%*s", width, "-");
    else
      std::snprintf(buf, sizeof buf, "%*.*f", width, prec, it->second.value);
    return buf;
  }

  // Picks a unit and prints 3 significant digits: 12.3 us, 4.56 ms, 187 ns.
  static std::string format_time(double s) {
    const char* unit = "s ";
    if (s < 1e-6) { s *= 1e9; unit = "ns"; }
    else if (s < 1e-3) { s *= 1e6; unit = "us"; }
    else if (s < 1) { s *= 1e3; unit = "ms"; }
    char buf[32];
    std::snprintf(buf, sizeof buf, "%8.*f %s", s < 10 ? 2 : s < 100 ? 1 : 0, s, unit);
    return buf;
  }

  std::vector<Run> rows_;
};

/// main() of the benchmark binaries: `--summary` installs SummaryReporter (and is removed before
/// benchmark::Initialize, which rejects unknown flags); without it the default reporter runs.
/// `--help` lists --summary and the binary's own extra_flags before Google Benchmark's flags.
inline int run_main(int argc, char** argv, const char* extra_flags = "") {
  bool summary = false;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (i > 0 && a == "--summary")
      summary = true;
    else
      args.push_back(argv[i]);
    if (i > 0 && (a == "--help" || a == "-h"))  // before Google Benchmark's own help, which exits
      std::printf("kvattn flags:\n  --summary                one table per binary instead of the console reporter\n%s\n",
                  extra_flags);
  }
  for (const char* a : args)
    if (summary && std::string_view(a).starts_with("--benchmark_format")) {
      std::fprintf(stderr, "--summary replaces the console format; for JSON use --benchmark_out_format=json\n");
      return 1;
    }
  int n = static_cast<int>(args.size());
  args.push_back(nullptr);  // argv[argc] is null by convention
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  if (summary) {
    SummaryReporter reporter;
    benchmark::RunSpecifiedBenchmarks(&reporter);
  } else {
    benchmark::RunSpecifiedBenchmarks();
  }
  benchmark::Shutdown();
  return 0;
}

}  // namespace kvattn_bench
