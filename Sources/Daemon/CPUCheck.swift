import CImageSupport
import Foundation

/// The x86-64-v3 features a build with NOLAD_CPU=x86-64-v3 (the default on x86-64 hosts, Package.swift)
/// lets the compiler use in the numeric targets, as read by `nolad_cpu_x86_features` (CPUID + XGETBV).
public struct CPUFeatures: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let avx = CPUFeatures(rawValue: NOLAD_CPU_AVX)
    public static let avx2 = CPUFeatures(rawValue: NOLAD_CPU_AVX2)
    public static let fma = CPUFeatures(rawValue: NOLAD_CPU_FMA)
    public static let bmi1 = CPUFeatures(rawValue: NOLAD_CPU_BMI1)
    public static let bmi2 = CPUFeatures(rawValue: NOLAD_CPU_BMI2)
    public static let f16c = CPUFeatures(rawValue: NOLAD_CPU_F16C)
    public static let lzcnt = CPUFeatures(rawValue: NOLAD_CPU_LZCNT)
    public static let movbe = CPUFeatures(rawValue: NOLAD_CPU_MOVBE)
    /// The operating system saves AVX registers (XCR0); without it AVX instructions fault.
    public static let osAVXState = CPUFeatures(rawValue: NOLAD_CPU_OS_AVX_STATE)

    /// Everything x86-64-v3 adds that the build may use, in the order a refusal names them.
    public static let x86_64_v3: [(feature: CPUFeatures, name: String)] = [
        (.avx2, "AVX2"), (.fma, "FMA"), (.avx, "AVX"), (.bmi1, "BMI1"), (.bmi2, "BMI2"), (.f16c, "F16C"),
        (.lzcnt, "LZCNT"), (.movbe, "MOVBE"), (.osAVXState, "operating-system support for AVX registers (XSAVE)"),
    ]

    /// This CPU's features (empty on other architectures than x86-64).
    public static var host: CPUFeatures { CPUFeatures(rawValue: nolad_cpu_x86_features()) }
}

/// The start-up check of an x86-64-v3 build: `nolad` runs it before anything else, so a CPU without
/// AVX2/FMA gets a sentence instead of SIGILL. Its code lives in Daemon and CImageSupport, which are
/// compiled without -march=x86-64-v3, so the check itself cannot fault.
public enum CPUCheck {
    /// Whether this binary's numeric code was compiled for x86-64-v3 (Package.swift defines the flag).
    public static var buildNeedsX86_64_v3: Bool {
        #if NOLAD_X86_64_V3
        return true
        #else
        return false
        #endif
    }

    /// Names of the x86-64-v3 features missing from `present`, in a fixed order.
    public static func missing(from present: CPUFeatures) -> [String] {
        CPUFeatures.x86_64_v3.filter { !present.contains($0.feature) }.map(\.name)
    }

    /// The refusal for a CPU with `present` features, or nil when it has everything x86-64-v3 needs.
    public static func refusal(present: CPUFeatures) -> String? {
        let lacking = missing(from: present)
        if lacking.isEmpty { return nil }
        return "this build of nolad needs a CPU with AVX2 and FMA (x86-64-v3); this CPU lacks \(englishList(lacking)). "
            + "Build nolad with NOLAD_CPU=generic for this machine (docs/platforms.md)."
    }

    /// What `nolad` checks first: nil when the binary may run here. NOLAD_CPU_CHECK_HIDE (a comma-separated
    /// list of the feature names above, case-insensitive) treats those features as absent, to try the refusal
    /// on a CPU that has them.
    public static func startupRefusal(environment: [String: String] = ProcessInfo.processInfo.environment) -> String? {
        guard buildNeedsX86_64_v3 else { return nil }
        var present = CPUFeatures.host
        if let hide = environment["NOLAD_CPU_CHECK_HIDE"] {
            let names = Set(hide.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces).lowercased() })
            for (feature, name) in CPUFeatures.x86_64_v3 where names.contains(name.lowercased()) { present.remove(feature) }
        }
        return refusal(present: present)
    }

    /// "A", "A and B", "A, B and C".
    static func englishList(_ items: [String]) -> String {
        switch items.count {
        case 0: return ""
        case 1: return items[0]
        default: return items.dropLast().joined(separator: ", ") + " and " + items.last!
        }
    }
}
