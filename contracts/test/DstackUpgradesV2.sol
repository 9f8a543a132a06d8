// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {DstackKms} from "../src/DstackKms.sol";
import {DstackApp} from "../src/DstackApp.sol";

/// @notice Test-only successors used to exercise UUPS upgrades with storage kept: each appends
/// one variable after the parent's storage and sets it in a `reinitializer(2)` that
/// `upgradeToAndCall` runs (call data "initializeV2()").
contract DstackKmsV2 is DstackKms {
    uint256 public migratedAtBlock;

    function initializeV2() external reinitializer(2) {
        migratedAtBlock = block.number;
    }

    function kmsVersion() external pure returns (uint256) {
        return 2;
    }
}

contract DstackAppV3 is DstackApp {
    uint256 public migratedAtBlock;

    function initializeV2() external reinitializer(2) {
        migratedAtBlock = block.number;
    }

    function version() public pure override returns (uint256) {
        return 3;
    }
}
