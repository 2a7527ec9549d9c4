@testable import Daemon
import XCTest

/// The x86-64-v3 start-up check (Sources/Daemon/CPUCheck.swift, Sources/CImageSupport/cpu_features.c).
final class CPUCheckTests: XCTestCase {
    private let all = CPUFeatures(CPUFeatures.x86_64_v3.map(\.feature))

    /// This machine runs the x86-64-v3 build, so CPUID must report every feature and the check must pass.
    func testHostCPU_hasEveryX86_64_v3Feature_andPassesTheCheck() throws {
        #if arch(x86_64)
        let host = CPUFeatures.host
        print("host CPU features: \(String(host.rawValue, radix: 16)), missing: \(CPUCheck.missing(from: host))")
        XCTAssertEqual(CPUCheck.missing(from: host), [])
        XCTAssertNil(CPUCheck.refusal(present: host))
        XCTAssertTrue(CPUCheck.buildNeedsX86_64_v3, "an x86-64 host builds for x86-64-v3 unless NOLAD_CPU=generic")
        XCTAssertNil(CPUCheck.startupRefusal(environment: [:]))
        #else
        XCTAssertEqual(CPUFeatures.host, [], "nolad_cpu_x86_features reports nothing off x86")
        XCTAssertNil(CPUCheck.startupRefusal(environment: ["NOLAD_CPU_CHECK_HIDE": "avx2"]))
        #endif
    }

    func testRefusal_namesEveryMissingFeature_inOneSentence() {
        XCTAssertNil(CPUCheck.refusal(present: all))
        XCTAssertEqual(CPUCheck.refusal(present: all.subtracting([.avx2])),
                       "this build of nolad needs a CPU with AVX2 and FMA (x86-64-v3); this CPU lacks AVX2. "
                       + "Build nolad with NOLAD_CPU=generic for this machine (docs/platforms.md).")
        XCTAssertEqual(CPUCheck.missing(from: all.subtracting([.fma, .avx2])), ["AVX2", "FMA"])
        XCTAssertTrue(CPUCheck.refusal(present: all.subtracting([.fma, .avx2, .bmi2]))!
            .contains("this CPU lacks AVX2, FMA and BMI2. "))
        // A Sandy Bridge-class CPU: AVX and OS support, nothing of v3's integer or FMA extensions.
        let sandyBridge: CPUFeatures = [.avx, .osAVXState]
        XCTAssertEqual(CPUCheck.missing(from: sandyBridge), ["AVX2", "FMA", "BMI1", "BMI2", "F16C", "LZCNT", "MOVBE"])
        // A CPU with every instruction but an OS that does not save AVX registers.
        XCTAssertTrue(CPUCheck.refusal(present: all.subtracting(.osAVXState))!
            .contains("lacks operating-system support for AVX registers (XSAVE)."))
        XCTAssertEqual(CPUCheck.missing(from: []).count, 9)
    }

    func testStartupRefusal_hidesTheFeaturesNamedInTheEnvironment() throws {
        #if arch(x86_64)
        let refusal = try XCTUnwrap(CPUCheck.startupRefusal(environment: ["NOLAD_CPU_CHECK_HIDE": "fma, AVX2,nonsense"]))
        XCTAssertTrue(refusal.contains("this CPU lacks AVX2 and FMA."), refusal)
        XCTAssertNil(CPUCheck.startupRefusal(environment: ["NOLAD_CPU_CHECK_HIDE": ""]))
        #endif
    }

    func testEnglishList() {
        XCTAssertEqual(CPUCheck.englishList(["A"]), "A")
        XCTAssertEqual(CPUCheck.englishList(["A", "B"]), "A and B")
        XCTAssertEqual(CPUCheck.englishList(["A", "B", "C"]), "A, B and C")
    }
}
