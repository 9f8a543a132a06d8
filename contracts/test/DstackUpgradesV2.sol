// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {DstackKms} from "../src/DstackKms.sol";
import {DstackApp} from "../src/DstackApp.sol";

/// @notice Test-only successors used to exercise UUPS upgrades with storage kept.
contract DstackKmsV2 is DstackKms {
    function kmsVersion() external pure returns (uint256) {
        return 2;
    }
}

contract DstackAppV3 is DstackApp {
    function version() public pure override returns (uint256) {
        return 3;
    }
}
