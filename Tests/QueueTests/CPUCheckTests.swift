@testable import Daemon
import XCTest

/// The x86-64-v3 start-up check (Sources/Daemon/CPUCheck.swift, Sources/CImageSupport/cpu_features.c).
final class CPUCheckTests: XCTestCase {
    private let all = CPUFeatures(CPUFeatures.x86_64_v3.map(\.feature))

    /// An x86-64-v3 build running here means CPUID must report every feature and the check must pass; a
    /// generic build (NOLAD_CPU=generic, or any aarch64 build) has no check at all.
    func testHostCPU_hasEveryX86_64_v3Feature_andPassesTheCheck() throws {
        let host = CPUFeatures.host
        print("host CPU features: \(String(host.rawValue, radix: 16)), missing: \(CPUCheck.missing(from: host)), "
              + "build needs x86-64-v3: \(CPUCheck.buildNeedsX86_64_v3)")
        #if !arch(x86_64)
        XCTAssertEqual(host, [], "nolad_cpu_x86_features reports nothing off x86")
        XCTAssertFalse(CPUCheck.buildNeedsX86_64_v3, "only x86-64 builds are compiled for x86-64-v3")
        #endif
        if CPUCheck.buildNeedsX86_64_v3 {
            XCTAssertEqual(CPUCheck.missing(from: host), [])
            XCTAssertNil(CPUCheck.refusal(present: host))
            XCTAssertNil(CPUCheck.startupRefusal(environment: [:]))
        } else {
            XCTAssertNil(CPUCheck.startupRefusal(environment: ["NOLAD_CPU_CHECK_HIDE": "avx2,fma"]), "a generic build checks nothing")
        }
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
        let refusal = CPUCheck.startupRefusal(environment: ["NOLAD_CPU_CHECK_HIDE": "fma, AVX2,nonsense"])
        if CPUCheck.buildNeedsX86_64_v3 {
            XCTAssertTrue(try XCTUnwrap(refusal).contains("this CPU lacks AVX2 and FMA."), refusal ?? "")
            XCTAssertNil(CPUCheck.startupRefusal(environment: ["NOLAD_CPU_CHECK_HIDE": ""]))
        } else {
            XCTAssertNil(refusal, "a generic build checks nothing")
        }
    }

    func testEnglishList() {
        XCTAssertEqual(CPUCheck.englishList(["A"]), "A")
        XCTAssertEqual(CPUCheck.englishList(["A", "B"]), "A and B")
        XCTAssertEqual(CPUCheck.englishList(["A", "B", "C"]), "A, B and C")
    }
}
