// The C++ unit tests' checks and registry, shared by the files of build/UnitTests/fml_unit_tests
// (main in unit-tests.cpp).
#pragma once

#include <cstdio>
#include <functional>
#include <vector>

namespace fml_test {

inline int g_failed = 0;
inline int g_checks = 0;

struct test_case {
    const char * name;
    std::function<void()> fn;
};

inline std::vector<test_case> & registry() {
    static std::vector<test_case> tests;
    return tests;
}

struct registrar {
    registrar(const char * name, std::function<void()> fn) { registry().push_back({ name, std::move(fn) }); }
};

} // namespace fml_test

#define CHECK(cond)                                                                  \
    do {                                                                             \
        ++fml_test::g_checks;                                                        \
        if (!(cond)) {                                                               \
            ++fml_test::g_failed;                                                    \
            std::fprintf(stderr, "  FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                            \
    } while (0)

#define TEST(name) \
    void name();   \
    fml_test::registrar name##_registrar(#name, name); \
    void name()
